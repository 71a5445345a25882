"""Terminology tables the mapping needs: modalities, anatomy, laterality, coding schemes, SOP classes.

Pure data and lookups; no I/O. Sources:

- DICOM PS3.16 CID 29 "Acquisition Modality" (the modalities that may appear in
  ``ImagingStudy.modality``; everything else, e.g. SR, KO, PR, SEG, REG, RTSTRUCT, only on its series).
- DICOM PS3.16 Annex L, the correspondence of Body Part Examined (0018,0015) defined terms with
  SNOMED CT anatomic region codes (CID 4031 "Common Anatomic Regions" and related context groups),
  for ``ImagingStudy.series.bodySite``. Terms whose code could not be verified are left out: an
  unknown term is omitted by the mapping (with a warning) rather than coded wrongly.
- DICOM PS3.16 CID 244 "Laterality" (SNOMED CT) for ``ImagingStudy.series.laterality``.
- pydicom's UID dictionary for SOP class names (``ImagingStudy.series.instance.sopClass.display``).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Final, NamedTuple

from pydicom.uid import UID

__all__ = [
    "ACCESSION_ID_CONCEPT",
    "ACCESSION_NUMBER_CONCEPT",
    "ACQUISITION_MODALITIES",
    "BODY_PARTS",
    "CONNECTION_TYPE_SYSTEM",
    "DCM_SYSTEM",
    "LATERALITY",
    "MADO_DEVICE_TYPE_SYSTEM",
    "PARTICIPATION_SYSTEM",
    "PAYLOAD_TYPE_SYSTEM",
    "PROVENANCE_PARTICIPANT_SYSTEM",
    "SNOMED_SYSTEM",
    "STUDY_INSTANCE_UID_CONCEPT",
    "STUDY_UID_SYSTEM",
    "URI_SYSTEM",
    "V2_0203_SYSTEM",
    "Concept",
    "body_part_concept",
    "coding_system",
    "is_acquisition_modality",
    "laterality_concept",
    "sop_class_name",
]

# Every code system and identifier system URI ingest writes has its one definition here.
SNOMED_SYSTEM: Final = "http://snomed.info/sct"
DCM_SYSTEM: Final = "http://dicom.nema.org/resources/ontology/DCM"
#: ImagingStudy.identifier.system of the Study Instance UID (``urn:dicom:uid|urn:oid:<uid>``).
STUDY_UID_SYSTEM: Final = "urn:dicom:uid"
#: A code or identifier that is itself a URI (SOP Class codings ``urn:oid:...``, an Endpoint's address).
URI_SYSTEM: Final = "urn:ietf:rfc:3986"
#: ImagingStudy.series.performer.function (HL7 v3 ParticipationType).
PARTICIPATION_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
#: Endpoint.connectionType code system (FHIR R4, extensible binding endpoint-connection-type).
CONNECTION_TYPE_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
#: Endpoint.payloadType code system (FHIR R4 endpoint-payload-type; MADO fixes the code ``none``).
PAYLOAD_TYPE_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/endpoint-payload-type"
#: IHE MADO device type code system: ``mado-creator`` "MADO Creator".
MADO_DEVICE_TYPE_SYSTEM: Final = "https://profiles.ihe.net/RAD/MADO/CodeSystem/MadoDeviceType"
#: Provenance.agent.type code system; MADO fixes ``assembler``.
PROVENANCE_PARTICIPANT_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"


class Concept(NamedTuple):
    """A code from a known code system, ready to become a FHIR ``Coding``."""

    system: str
    code: str
    display: str


#: HL7 v2 table 0203 (identifier type), as a FHIR code system.
V2_0203_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/v2-0203"

#: DICOM PS3.16 Annex D (DCM) concept "Study Instance UID": the type of the study's identifier (the
#: MADO Study Instance UID identifier profile fixes it).
STUDY_INSTANCE_UID_CONCEPT: Final = Concept(DCM_SYSTEM, "110180", "Study Instance UID")
#: v2-0203 ``ACSN`` "Accession ID" and DCM 121022 "Accession Number": the two codings the MADO
#: Accession Number identifier profile requires in ``Identifier.type``.
ACCESSION_ID_CONCEPT: Final = Concept(V2_0203_SYSTEM, "ACSN", "Accession ID")
ACCESSION_NUMBER_CONCEPT: Final = Concept(DCM_SYSTEM, "121022", "Accession Number")
#: v2-0203 identifier types of the order and visit references (docs/mapping.md "Order, visit, referrer")
PLACER_ORDER_CONCEPT: Final = Concept(V2_0203_SYSTEM, "PLAC", "Placer Identifier")
FILLER_ORDER_CONCEPT: Final = Concept(V2_0203_SYSTEM, "FILL", "Filler Identifier")
VISIT_NUMBER_CONCEPT: Final = Concept(V2_0203_SYSTEM, "VN", "Visit number")


# DICOM PS3.16 CID 29 Acquisition Modality (DCM codes, code meaning as in the standard).
# HC (Hard Copy), SR, KO, PR, SEG, REG, RTSTRUCT, RTPLAN, RTDOSE, DOC, OT ... are modalities of
# CID 33 but not acquisition modalities, so they never appear in ImagingStudy.modality.
ACQUISITION_MODALITIES: Final[dict[str, str]] = {
    "AR": "Autorefraction",
    "BDUS": "Ultrasound Bone Densitometry",
    "BI": "Biomagnetic Imaging",
    "BMD": "Bone Mineral Densitometry",
    "CFM": "Confocal Microscopy",
    "CR": "Computed Radiography",
    "CT": "Computed Tomography",
    "DG": "Diaphanography",
    "DMS": "Dermoscopy",
    "DX": "Digital Radiography",
    "ECG": "Electrocardiography",
    "EEG": "Electroencephalography",
    "EMG": "Electromyography",
    "EOG": "Electrooculography",
    "EPS": "Cardiac Electrophysiology",
    "ES": "Endoscopy",
    "GM": "General Microscopy",
    "HD": "Hemodynamic Waveform",
    "IO": "Intra-oral Radiography",
    "IVOCT": "Intravascular Optical Coherence Tomography",
    "IVUS": "Intravascular Ultrasound",
    "KER": "Keratometry",
    "LEN": "Lensometry",
    "LS": "Laser Scan",
    "MG": "Mammography",
    "MR": "Magnetic Resonance",
    "NM": "Nuclear Medicine",
    "OAM": "Ophthalmic Axial Measurements",
    "OCT": "Optical Coherence Tomography",
    "OP": "Ophthalmic Photography",
    "OPM": "Ophthalmic Mapping",
    "OPT": "Ophthalmic Tomography",
    "OPTBSV": "Ophthalmic Tomography B-scan Volume Analysis",
    "OPTENF": "Ophthalmic Tomography En Face",
    "OPV": "Ophthalmic Visual Field",
    "OSS": "Optical Surface Scanner",
    "PA": "Photoacoustic",
    "POS": "Position Sensor",
    "PT": "Positron emission tomography",
    "PX": "Panoramic X-Ray",
    "RESP": "Respiratory Waveform",
    "RF": "Radiofluoroscopy",
    "RG": "Radiographic imaging",
    "RTIMAGE": "RT Image",
    "SM": "Slide Microscopy",
    "SRF": "Subjective Refraction",
    "TG": "Thermography",
    "US": "Ultrasound",
    "VA": "Visual Acuity",
    "XA": "X-Ray Angiography",
    "XC": "External-camera Photography",
}

# DICOM PS3.16 Annex L: Body Part Examined (0018,0015) defined term -> SNOMED CT (code, meaning).
# CHEST follows docs/mapping.md: 51185008 "Thorax".
BODY_PARTS: Final[dict[str, tuple[str, str]]] = {
    "ABDOMEN": ("818981001", "Abdomen"),
    "ABDOMENPELVIS": ("818982008", "Abdomen and Pelvis"),
    "ABDOMINALAORTA": ("7832008", "Abdominal aorta"),
    "ACJOINT": ("85856004", "Acromioclavicular joint"),
    "ADRENAL": ("23451007", "Adrenal gland"),
    "ANKLE": ("70258002", "Ankle joint"),
    "AORTA": ("15825003", "Aorta"),
    "APPENDIX": ("66754008", "Appendix"),
    "ARM": ("40983000", "Upper arm"),
    "AXILLA": ("91470000", "Axilla"),
    "BACK": ("77568009", "Back"),
    "BILEDUCT": ("28273000", "Bile duct"),
    "BLADDER": ("89837001", "Bladder"),
    "BRAIN": ("12738006", "Brain"),
    "BREAST": ("76752008", "Breast"),
    "BRONCHUS": ("955009", "Bronchus"),
    "BUTTOCK": ("46862004", "Buttock"),
    "CALCANEUS": ("80144004", "Calcaneus"),
    "CALF": ("53840002", "Calf of leg"),
    "CAROTID": ("69105007", "Carotid Artery"),
    "CEREBELLUM": ("113305005", "Cerebellum"),
    "CERVIX": ("71252005", "Cervix"),
    "CHEEK": ("60819002", "Cheek"),
    "CHEST": ("51185008", "Thorax"),
    "CHESTABDOMEN": ("416550000", "Chest and Abdomen"),
    "CHESTABDPELVIS": ("416775004", "Chest, Abdomen and Pelvis"),
    "CIRCLEOFWILLIS": ("11279006", "Circle of Willis"),
    "CLAVICLE": ("51299004", "Clavicle"),
    "COCCYX": ("64688005", "Coccyx"),
    "COLON": ("71854001", "Colon"),
    "COMMONBILEDUCT": ("79741001", "Common bile duct"),
    "CORNEA": ("28726007", "Cornea"),
    "CORONARYARTERY": ("41801008", "Coronary artery"),
    "CSPINE": ("122494005", "Cervical spine"),
    "CTSPINE": ("1217257000", "Cervico-thoracic spine"),
    "DUODENUM": ("38848004", "Duodenum"),
    "EAR": ("117590005", "Ear"),
    "ELBOW": ("16953009", "Elbow joint"),
    "ESOPHAGUS": ("32849002", "Esophagus"),
    "EXTREMITY": ("66019005", "Extremity"),
    "EYE": ("81745001", "Eye"),
    "EYELID": ("80243003", "Eyelid"),
    "FACE": ("89545001", "Face"),
    "FEMUR": ("71341001", "Femur"),
    "FIBULA": ("87342007", "Fibula"),
    "FINGER": ("7569003", "Finger"),
    "FOOT": ("56459004", "Foot"),
    "FOREARM": ("14975008", "Forearm"),
    "GALLBLADDER": ("28231008", "Gallbladder"),
    "HAND": ("85562004", "Hand"),
    "HEAD": ("69536005", "Head"),
    "HEADNECK": ("774007", "Head and Neck"),
    "HEART": ("80891009", "Heart"),
    "HIP": ("24136001", "Hip joint"),
    "HUMERUS": ("85050009", "Humerus"),
    "IAC": ("361078006", "Internal Auditory Canal"),
    "ILEUM": ("34516001", "Ileum"),
    "ILIUM": ("22356005", "Ilium"),
    "JAW": ("661005", "Jaw region"),
    "JEJUNUM": ("21306003", "Jejunum"),
    "KIDNEY": ("64033007", "Kidney"),
    "KNEE": ("72696002", "Knee"),
    "LARGEINTESTINE": ("14742008", "Large intestine"),
    "LARYNX": ("4596009", "Larynx"),
    "LEG": ("30021000", "Lower leg"),
    "LIVER": ("10200004", "Liver"),
    "LSPINE": ("122496007", "Lumbar spine"),
    "LSSPINE": ("1217253001", "Lumbo-sacral spine"),
    "LUNG": ("39607008", "Lung"),
    "MASTOID": ("59066005", "Mastoid bone"),
    "MAXILLA": ("70925003", "Maxilla"),
    "MEDIASTINUM": ("72410000", "Mediastinum"),
    "MOUTH": ("123851003", "Mouth"),
    "NECK": ("45048000", "Neck"),
    "NECKCHEST": ("417437006", "Neck and Chest"),
    "NECKCHESTABDOMEN": ("416152001", "Neck, Chest and Abdomen"),
    "NECKCHESTABDPELV": ("416319003", "Neck, Chest, Abdomen and Pelvis"),
    "NOSE": ("45206002", "Nose"),
    "OPTICCANAL": ("55024004", "Optic canal"),
    "ORBIT": ("363654007", "Orbital structure"),
    "OVARY": ("15497006", "Ovary"),
    "PANCREAS": ("15776009", "Pancreas"),
    "PANCREATICDUCT": ("69930009", "Pancreatic duct"),
    "PAROTID": ("45289007", "Parotid gland"),
    "PATELLA": ("64234005", "Patella"),
    "PELVIS": ("816092008", "Pelvis"),
    "PENIS": ("18911002", "Penis"),
    "PHARYNX": ("54066008", "Pharynx"),
    "PROSTATE": ("41216001", "Prostate"),
    "RADIUS": ("62413002", "Radius"),
    "RADIUSULNA": ("110535000", "Radius and ulna"),
    "RECTUM": ("34402009", "Rectum"),
    "RIB": ("113197003", "Rib"),
    "SCALP": ("41695006", "Scalp"),
    "SCAPULA": ("79601000", "Scapula"),
    "SCJOINT": ("7844006", "Sternoclavicular joint"),
    "SCLERA": ("18619003", "Sclera"),
    "SCROTUM": ("20233005", "Scrotum"),
    "SELLA": ("42575006", "Sella turcica"),
    "SESAMOID": ("58742003", "Sesamoid bones of foot"),
    "SHOULDER": ("16982005", "Shoulder"),
    "SIJOINT": ("39723000", "Sacroiliac joint"),
    "SKULL": ("89546000", "Skull"),
    "SMALLINTESTINE": ("30315005", "Small intestine"),
    "SPINALCORD": ("2748008", "Spinal cord"),
    "SPINE": ("421060004", "Spine"),
    "SPLEEN": ("78961009", "Spleen"),
    "SSPINE": ("54735007", "Sacrum"),
    "STERNUM": ("56873002", "Sternum"),
    "STOMACH": ("69695003", "Stomach"),
    "SUBMANDIBULAR": ("54019009", "Submandibular gland"),
    "TESTIS": ("40689003", "Testis"),
    "THIGH": ("68367000", "Thigh"),
    "THUMB": ("76505004", "Thumb"),
    "THYMUS": ("9875009", "Thymus"),
    "THYROID": ("69748006", "Thyroid"),
    "TIBIA": ("12611008", "Tibia"),
    "TIBIAFIBULA": ("110536004", "Tibia and fibula"),
    "TLSPINE": ("1217256009", "Thoraco-lumbar spine"),
    "TMJ": ("53620006", "Temporomandibular joint"),
    "TOE": ("29707007", "Toe"),
    "TONGUE": ("21974007", "Tongue"),
    "TRACHEA": ("44567001", "Trachea"),
    "TSPINE": ("122495006", "Thoracic spine"),
    "ULNA": ("23416004", "Ulna"),
    "UPRURINARYTRACT": ("431491007", "Upper urinary tract"),
    "URETER": ("87953007", "Ureter"),
    "URETHRA": ("13648007", "Urethra"),
    "UTERUS": ("35039007", "Uterus"),
    "VAGINA": ("76784001", "Vagina"),
    "VULVA": ("45292006", "Vulva"),
    "WHOLEBODY": ("38266002", "Entire body"),
    "WRIST": ("74670003", "Wrist joint"),
    "ZYGOMA": ("13881006", "Zygoma"),
}

# DICOM PS3.16 CID 244 Laterality: Laterality (0020,0060) / Image Laterality (0020,0062) -> SNOMED CT.
# "U" (unpaired) has no laterality code and maps to nothing.
LATERALITY: Final[dict[str, tuple[str, str]]] = {
    "R": ("24028007", "Right"),
    "L": ("7771000", "Left"),
    "B": ("51440002", "Right and left"),
}

# Coding Scheme Designator (0008,0102) -> FHIR code system URI.
_CODING_SYSTEMS: Final[dict[str, str]] = {
    "SCT": SNOMED_SYSTEM,
    "SRT": SNOMED_SYSTEM,  # legacy SNOMED-RT designator; codes are still SNOMED
    "LN": "http://loinc.org",
    "DCM": DCM_SYSTEM,
    "RADLEX": "http://www.radlex.org",
    "UCUM": "http://unitsofmeasure.org",
    "I10": "http://hl7.org/fhir/sid/icd-10",
    "ICD10": "http://hl7.org/fhir/sid/icd-10",
}


def is_acquisition_modality(modality: str | None) -> bool:
    """Whether ``modality`` is in DICOM CID 29 (and so may appear in ``ImagingStudy.modality``).

    Parameters
    ----------
    modality:
        A Modality (0008,0060) value, compared exactly after stripping blanks.
    """
    return modality is not None and modality.strip() in ACQUISITION_MODALITIES


def body_part_concept(term: str | None) -> Concept | None:
    """SNOMED CT concept for a Body Part Examined (0018,0015) term, per PS3.16 Annex L.

    Parameters
    ----------
    term:
        The defined term; surrounding blanks are ignored and lower case is accepted.

    Returns
    -------
    Concept | None
        ``None`` for an empty or unknown term (never a made-up code).
    """
    if not term:
        return None
    found = BODY_PARTS.get(term.strip().upper())
    return Concept(SNOMED_SYSTEM, *found) if found else None


def laterality_concept(value: str | None) -> Concept | None:
    """SNOMED CT concept for a Laterality (0020,0060) or Image Laterality (0020,0062) value.

    Returns ``None`` for ``U`` (unpaired), empty or unknown values.
    """
    if not value:
        return None
    found = LATERALITY.get(value.strip().upper())
    return Concept(SNOMED_SYSTEM, *found) if found else None


def coding_system(designator: str | None) -> str | None:
    """FHIR code system URI for a DICOM Coding Scheme Designator (0008,0102).

    Known designators map to their canonical URIs (``SCT``/``SRT`` -> SNOMED CT, ``LN`` -> LOINC,
    ``DCM``, ``RADLEX``, ``UCUM``, ``I10``/``ICD10``). Any other designator (a private ``99...``
    scheme, a local one) has no URI ``ingest`` knows, and none is invented: ``Coding.system`` is a
    URI other systems resolve and compare, and a made-up one would claim a code system nobody
    defines. Such a code keeps its ``code`` and ``display`` without a ``system`` (docs/mapping.md).

    Returns
    -------
    str | None
        The system URI; ``None`` for an empty or unknown designator.
    """
    if designator is None or not designator.strip():
        return None
    return _CODING_SYSTEMS.get(designator.strip().upper())


@lru_cache(maxsize=1024)
def sop_class_name(uid: str | None) -> str | None:
    """The SOP class name pydicom knows for ``uid`` (e.g. "CT Image Storage"), else ``None``.

    Only UIDs registered as SOP classes count: a transfer syntax or other UID returns ``None``.
    """
    if not uid:
        return None
    sop = UID(uid.strip())
    return sop.name if sop.type == "SOP Class" else None  # type is "" for UIDs pydicom does not know
