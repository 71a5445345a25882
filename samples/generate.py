"""Write synthetic DICOM Part-10 corpora for tests, samples and benchmarks.

Everything is invented: patients, physicians, identifiers, dates and pixels. A run is a pure function
of its arguments: the same arguments (and the same seed) give byte-identical files, because every UID
is ``2.25.<integer>`` derived from the seed and the object's position, every "random" choice comes
from a :class:`random.Random` seeded with a string, and the file meta information carries a fixed
implementation class UID and version name instead of pydicom's.

Studies cycle through a table of *profiles* (Japanese CT with an SR, German MR with a KO, Korean US
with a multi-frame cine, Greek CR/DX with one big-endian file, ...), so any corpus of ``n`` studies
covers the first ``n`` profiles, and 9 or more studies cover all of them.

Command line::

    python -m samples.generate --out DIR [--studies N] [--files N] [--small] [--ct-series N]
                               [--seed S] [--tiny] [--matrix N]

File paths are ``study-NNN/series-NN/inst-NNNNN.dcm``: positions, never DICOM values.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import struct
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from pydicom.charset import convert_encodings
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    BasicTextSRStorage,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    KeyObjectSelectionDocumentStorage,
    MRImageStorage,
    NuclearMedicineImageStorage,
    PositronEmissionTomographyImageStorage,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    XRayAngiographicImageStorage,
)

__all__ = [
    "JAPANESE_NAME",
    "GeneratedCorpus",
    "GeneratedSeries",
    "GeneratedStudy",
    "generate",
    "main",
    "uid_for",
]

JAPANESE_NAME = "Yamada^Tarou=山田^太郎=やまだ^たろう"
"""The Japanese three-group patient name of the first profile (PS3.5 Annex H style)."""

# Fixed file meta identity, so the bytes do not change with the pydicom version that wrote them.
_IMPLEMENTATION_CLASS_UID = "2.25.274069893146185349236934584946385563553"  # (0002,0012)
_IMPLEMENTATION_VERSION = "INGEST_SAMPLES1"  # (0002,0013), SH <= 16 chars

_SMALL_STUDIES = 4
_SMALL_FILES = 24
_SMALL_MATRIX = 16
_DEFAULT_STUDIES = 8
_DEFAULT_FILES = 200
_DEFAULT_MATRIX = 64
_CT_MATRIX = 512


# --------------------------------------------------------------------------------------------------
# Result


@dataclass(frozen=True)
class GeneratedSeries:
    """One written series: what a correct pipeline must report for it."""

    series_uid: str
    modality: str
    sop_class_uid: str
    transfer_syntax_uid: str
    instances: int
    frames: int
    directory: str  # relative to the corpus root


@dataclass(frozen=True)
class GeneratedStudy:
    """One written study and the values a test can check the pipeline's output against."""

    study_uid: str
    profile: str
    specific_character_set: str  # as written, multiple values joined with a backslash
    patient_name: str  # the exact Unicode written to (0010,0010)
    patient_id: str
    accession_number: str | None
    timezone_offset: str | None
    series: tuple[GeneratedSeries, ...]
    directory: str  # relative to the corpus root

    @property
    def instances(self) -> int:
        """Number of SOP instances (= files) written for the study."""
        return sum(s.instances for s in self.series)

    @property
    def modalities(self) -> frozenset[str]:
        """Modalities of all series, acquisition and non-acquisition alike."""
        return frozenset(s.modality for s in self.series)


@dataclass(frozen=True)
class GeneratedCorpus:
    """What :func:`generate` wrote: counts and per-study expectations, independent of ``ingest``."""

    root: Path
    seed: int
    studies: tuple[GeneratedStudy, ...]
    files: int
    total_bytes: int
    tiny: bool = False

    @property
    def study_uids(self) -> list[str]:
        """Study Instance UIDs in generation order."""
        return [s.study_uid for s in self.studies]

    @property
    def expected(self) -> dict[str, tuple[int, int]]:
        """``{study_uid: (number_of_series, number_of_instances)}``."""
        return {s.study_uid: (len(s.series), s.instances) for s in self.studies}

    def paths(self) -> list[Path]:
        """All written files, sorted."""
        return sorted(self.root.glob("study-*/series-*/*.dcm"))


# --------------------------------------------------------------------------------------------------
# Profiles: what a study looks like


@dataclass(frozen=True)
class _SeriesSpec:
    modality: str
    sop_class: str
    description: str
    weight: int = 0  # share of the study's image budget; 0 = a fixed single-instance object
    kind: str = "image"  # "image" | "sr" | "ko"
    frames: int = 1
    bits: int = 16
    transfer_syntax: str = ExplicitVRLittleEndian
    body_part: str | None = None
    laterality: str | None = None
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL")
    big_endian_first: bool = False  # the corpus's one Explicit VR Big Endian file


@dataclass(frozen=True)
class _Profile:
    key: str
    charset: tuple[str, ...]  # () = default repertoire, (0008,0005) absent
    patient_name: str
    patient_sex: str
    referring: str
    readers: tuple[str, ...]
    performing: tuple[str, ...]
    operators: tuple[str, ...]
    description: str
    reason: str
    procedure: tuple[str, str, str]  # (designator, value, meaning)
    timezone: str | None
    accession: bool
    accession_uid: bool
    series: tuple[_SeriesSpec, ...] = field(default_factory=tuple)


_EVLE = ExplicitVRLittleEndian
_IVLE = ImplicitVRLittleEndian

# Codes are illustrative; the coding scheme designators (SCT, LN, RADLEX) are the real ones.
_PROFILES: tuple[_Profile, ...] = (
    _Profile(
        key="ja-ct",
        charset=("", "ISO 2022 IR 87"),
        patient_name=JAPANESE_NAME,
        patient_sex="M",
        referring="Suzuki^Ichiro=鈴木^一郎=すずき^いちろう",
        readers=("Tanaka^Hanako=田中^花子=たなか^はなこ",),
        performing=("Sato^Kenji=佐藤^健二=さとう^けんじ",),
        operators=("Ito^Yui",),
        description="胸部CT",
        reason="慢性咳嗽",
        procedure=("LN", "24627-2", "CT Chest"),
        timezone="+0900",
        accession=True,
        accession_uid=True,
        series=(
            _SeriesSpec(
                "CT",
                CTImageStorage,
                "Scout",
                1,
                body_part="CHEST",
                image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
            ),
            _SeriesSpec("CT", CTImageStorage, "Thorax 1.0 B70f", 8, body_part="CHEST"),
            _SeriesSpec("SR", BasicTextSRStorage, "Report", kind="sr"),
        ),
    ),
    _Profile(
        key="de-mr",
        charset=("ISO_IR 100",),
        patient_name="Müller^Jürgen",
        patient_sex="M",
        referring="Krüger^Hans^^Dr. med.",
        readers=("Schäfer^Björn", "Größ^Anna"),
        performing=("Weiß^Karl",),
        operators=("Böhm^Lena",),
        description="MRT Schädel",
        reason="Kopfschmerzen, Ausschluss Raumforderung",
        procedure=("RADLEX", "RPID4464", "MRI Brain without contrast"),
        timezone=None,
        accession=True,
        accession_uid=False,
        series=(
            _SeriesSpec("MR", MRImageStorage, "t1_se_sag", 3, transfer_syntax=_IVLE, body_part="HEAD"),
            _SeriesSpec("MR", MRImageStorage, "t2_tse_tra", 4, body_part="BRAIN"),
            _SeriesSpec("KO", KeyObjectSelectionDocumentStorage, "Key Images", kind="ko"),
        ),
    ),
    _Profile(
        key="ko-us",
        charset=("", "ISO 2022 IR 149"),
        patient_name="Hong^Gildong=洪^吉洞=홍^길동",
        patient_sex="M",
        referring="Kim^Minjun=金^敏俊=김^민준",
        readers=("Lee^Jeongsu=李^正秀=이^정수",),
        performing=("Park^Jiho",),
        operators=("Choi^Yuna",),
        description="복부 초음파",
        reason="복통",
        procedure=("SCT", "45036003", "Ultrasonography of abdomen"),
        timezone="+0900",
        accession=True,
        accession_uid=True,
        series=(
            _SeriesSpec(
                "US", UltrasoundImageStorage, "Abdomen", 5, bits=8, transfer_syntax=_IVLE, body_part="ABDOMEN"
            ),
            _SeriesSpec(
                "US", UltrasoundMultiFrameImageStorage, "Liver cine", frames=8, bits=8, body_part="ABDOMEN"
            ),
        ),
    ),
    _Profile(
        key="el-cr",
        charset=("ISO_IR 126",),
        patient_name="Παπαδοπούλου^Ελένη",
        patient_sex="F",
        referring="Γεωργίου^Νίκος",
        readers=("Ιωάννου^Μαρία",),
        performing=(),
        operators=("Κωνσταντίνου^Άννα",),
        description="Ακτινογραφία θώρακος",
        reason="Πυρετός",
        procedure=("LN", "36643-5", "XR Chest 2 Views"),
        timezone="+0200",
        accession=True,
        accession_uid=False,
        series=(
            _SeriesSpec(
                "CR",
                ComputedRadiographyImageStorage,
                "Thorax PA",
                2,
                body_part="CHEST",
                image_type=("ORIGINAL", "PRIMARY"),
                big_endian_first=True,
            ),
            _SeriesSpec(
                "DX",
                DigitalXRayImageStorageForPresentation,
                "Thorax lat",
                1,
                body_part="CHEST",
                image_type=("ORIGINAL", "PRIMARY"),
            ),
        ),
    ),
    _Profile(
        key="de-mg",
        charset=("ISO_IR 192",),
        patient_name="Weiß-Schäfer^Anneliese",
        patient_sex="F",
        referring="Öztürk^Ayşe",
        readers=("Đorđević^Ana", "Nowak^Zofia"),
        performing=(),
        operators=("Jäger^Ute",),
        description="Mammographie Screening",
        reason="Früherkennung",
        procedure=("SCT", "24623002", "Screening mammography"),
        timezone="+0100",
        accession=True,
        accession_uid=True,
        series=(
            _SeriesSpec(
                "MG",
                DigitalMammographyXRayImageStorageForPresentation,
                "L CC/MLO",
                2,
                body_part="BREAST",
                laterality="L",
                image_type=("ORIGINAL", "PRIMARY"),
            ),
            _SeriesSpec(
                "MG",
                DigitalMammographyXRayImageStorageForPresentation,
                "R CC/MLO",
                2,
                body_part="BREAST",
                laterality="R",
                image_type=("ORIGINAL", "PRIMARY"),
            ),
            _SeriesSpec("KO", KeyObjectSelectionDocumentStorage, "Key Images", kind="ko"),
        ),
    ),
    _Profile(
        key="en-ptct",
        charset=(),
        patient_name="Testpatient^Alpha",
        patient_sex="M",
        referring="Smith^John^^Dr.",
        readers=("Jones^Ann", "Brown^Lee"),
        performing=("Miller^Sam",),
        operators=("Davis^Pat",),
        description="PET-CT Whole Body",
        reason="Staging",
        procedure=("LN", "44139-4", "PET whole body"),
        timezone=None,
        accession=False,
        accession_uid=False,
        series=(
            _SeriesSpec("CT", CTImageStorage, "CT AC 3.0", 3, body_part="WHOLEBODY"),
            _SeriesSpec("PT", PositronEmissionTomographyImageStorage, "PET AC", 4, body_part="WHOLEBODY"),
        ),
    ),
    _Profile(
        key="fr-nm",
        charset=("ISO_IR 100",),
        patient_name="Lefèvre^Zoé",
        patient_sex="F",
        referring="Dubois^Élise",
        readers=("Girard^François",),
        performing=(),
        operators=("Rousseau^Cécile",),
        description="Scintigraphie osseuse",
        reason="Douleurs osseuses",
        procedure=("RADLEX", "RPID2411", "NM Bone scan whole body"),
        timezone="+0100",
        accession=True,
        accession_uid=True,
        series=(
            _SeriesSpec(
                "NM",
                NuclearMedicineImageStorage,
                "WB ANT/POST",
                3,
                frames=2,
                body_part="WHOLEBODY",
                image_type=("ORIGINAL", "PRIMARY", "WHOLE BODY", "EMISSION"),
            ),
        ),
    ),
    _Profile(
        key="sv-xa",
        charset=("ISO_IR 192",),
        patient_name="Øster^Åse",
        patient_sex="F",
        referring="Lindqvist^Göran",
        readers=("Ångström^Nils",),
        performing=("Berg^Ulla",),
        operators=("Sjöberg^Kai",),
        description="Koronarangiografi",
        reason="Bröstsmärta",
        procedure=("SCT", "33367005", "Coronary angiography"),
        timezone=None,
        accession=True,
        accession_uid=False,
        series=(
            _SeriesSpec(
                "XA",
                XRayAngiographicImageStorage,
                "LCA RAO",
                2,
                frames=4,
                bits=8,
                body_part="HEART",
                image_type=("ORIGINAL", "PRIMARY", "SINGLE PLANE"),
            ),
            _SeriesSpec("SR", BasicTextSRStorage, "Report", kind="sr"),
        ),
    ),
    _Profile(
        key="en-mr-knee",
        charset=(),
        patient_name="Sample^Kim",
        patient_sex="F",
        referring="Garcia^Luis",
        readers=("Wong^Mei",),
        performing=("Taylor^Jo",),
        operators=("Clark^Ray",),
        description="MR Knee",
        reason="Knee pain after fall",
        procedure=("LN", "24822-9", "MR Knee"),
        timezone="-0500",
        accession=True,
        accession_uid=True,
        series=(
            _SeriesSpec("MR", MRImageStorage, "pd_fs_sag", 3, body_part="KNEE", laterality="R"),
            _SeriesSpec("MR", MRImageStorage, "t2_cor", 2, body_part="KNEE", laterality="R"),
        ),
    ),
)

_CT_PROFILE = _Profile(
    key="ct-series",
    charset=("ISO_IR 100",),
    patient_name="Groß^Hannelore",
    patient_sex="F",
    referring="Vogel^Dieter",
    readers=("Koch^Sabine",),
    performing=("Fischer^Uwe",),
    operators=("Klein^Petra",),
    description="CT Abdomen",
    reason="Kontrolle",
    procedure=("LN", "24558-9", "CT Abdomen"),
    timezone="+0100",
    accession=True,
    accession_uid=True,
    series=(_SeriesSpec("CT", CTImageStorage, "Abdomen 1.0 Br40", 1, body_part="ABDOMEN"),),
)


# --------------------------------------------------------------------------------------------------
# Helpers


def uid_for(seed: int, *parts: object) -> str:
    """Return a deterministic ``2.25.<int>`` UID for ``parts`` under ``seed``.

    Parameters
    ----------
    seed:
        The corpus seed.
    *parts:
        What the UID identifies (e.g. ``"study", 3``).

    Returns
    -------
    str
        At most 44 characters; valid per the DICOM UID grammar (no leading zeros).
    """
    key = "/".join([str(seed), *map(str, parts)]).encode()
    return "2.25." + str(int.from_bytes(hashlib.sha256(key).digest()[:16], "big") or 1)


def _split(total: int, weights: Sequence[int]) -> list[int]:
    """Split ``total`` over ``weights`` by largest remainder, each share at least 1 if possible."""
    n = len(weights)
    if n == 0:
        return []
    shares = [1] * n if total >= n else [1 if i < total else 0 for i in range(n)]
    rest = total - sum(shares)
    if rest > 0:
        wsum = sum(weights)
        exact = [rest * w / wsum for w in weights]
        extra = [int(x) for x in exact]
        left = rest - sum(extra)
        order = sorted(range(n), key=lambda i: (-(exact[i] - extra[i]), i))
        for i in order[:left]:
            extra[i] += 1
        shares = [s + e for s, e in zip(shares, extra, strict=True)]
    return shares


def _plan_study(spec: _Profile, budget: int) -> list[tuple[_SeriesSpec, int]]:
    """Decide how many instances each series of a study gets, summing exactly to ``budget``."""
    images = [s for s in spec.series if s.weight > 0]
    fixed = [s for s in spec.series if s.weight == 0]
    # fixed single-instance objects (SR, KO, a multi-frame cine) go first when there is room
    keep_fixed = fixed[: max(0, budget - len(images))] if images else fixed[:budget]
    image_budget = budget - len(keep_fixed)
    counts = _split(image_budget, [s.weight for s in images])
    plan = [(s, c) for s, c in zip(images, counts, strict=True) if c > 0]
    by_spec = {id(s): c for s, c in plan}
    ordered: list[tuple[_SeriesSpec, int]] = []
    for s in spec.series:  # keep the profile's series order
        if id(s) in by_spec:
            ordered.append((s, by_spec[id(s)]))
        elif s in keep_fixed:
            ordered.append((s, 1))
    return ordered


@lru_cache(maxsize=32)
def _base_pixels(rows: int, cols: int, bits: int) -> bytes:
    """A phantom-like little-endian image: a bright disc on a gradient, ``bits`` 8 or 16."""
    cy, cx, r2 = rows / 2, cols / 2, (min(rows, cols) * 0.35) ** 2
    if bits == 8:
        out8 = bytearray(rows * cols)
        for y in range(rows):
            for x in range(cols):
                inside = (y - cy) ** 2 + (x - cx) ** 2 < r2
                out8[y * cols + x] = 200 if inside else (x * 4 + y) % 120
        return bytes(out8)
    out16 = array("H", bytes(2 * rows * cols))
    for y in range(rows):
        for x in range(cols):
            inside = (y - cy) ** 2 + (x - cx) ** 2 < r2
            out16[y * cols + x] = 1800 if inside else (x * 7 + y * 3) % 1024
    if sys.byteorder == "big":  # pragma: no cover - the corpus is defined in little endian
        out16.byteswap()
    return out16.tobytes()


def _pixels(rows: int, cols: int, bits: int, frames: int, shift: int, big_endian: bool) -> bytes:
    """Pixel Data (7FE0,0010) for one instance: the base image rolled by ``shift`` rows per frame."""
    base = _base_pixels(rows, cols, bits)
    row = cols * (bits // 8)
    parts = []
    for f in range(frames):
        k = ((shift + f) % rows) * row
        parts.append(base[k:] + base[:k])
    data = b"".join(parts)
    if big_endian and bits == 16:
        swapped = array("H", data)
        swapped.byteswap()
        data = swapped.tobytes()
    return data


def _code(designator: str, value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value  # (0008,0100)
    item.CodingSchemeDesignator = designator  # (0008,0102)
    item.CodeMeaning = meaning  # (0008,0104)
    return item


def _file_meta(sop_class: str, sop_uid: str, transfer_syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)  # (0002,0002)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)  # (0002,0003)
    meta.TransferSyntaxUID = UID(transfer_syntax)  # (0002,0010)
    meta.ImplementationClassUID = UID(_IMPLEMENTATION_CLASS_UID)  # (0002,0012)
    meta.ImplementationVersionName = _IMPLEMENTATION_VERSION  # (0002,0013)
    return meta


def _charset_value(charset: tuple[str, ...]) -> str | list[str]:
    return list(charset) if len(charset) > 1 else charset[0]


def _tm(seconds: int, frac: int | None = None) -> str:
    seconds %= 86400
    hh, rem = divmod(seconds, 3600)
    mm, ss = divmod(rem, 60)
    return f"{hh:02d}{mm:02d}{ss:02d}" + (f".{frac:06d}" if frac is not None else "")


# --------------------------------------------------------------------------------------------------
# Tiny files: the series-level elements are encoded once by pydicom, the per-instance ones by hand


def _short_element(group: int, elem: int, vr: bytes, value: bytes, implicit: bool) -> bytes:
    """Encode one short-VR element (UI, SH, IS, UL) in little endian; ``value`` already padded."""
    if implicit:
        return struct.pack("<HHI", group, elem, len(value)) + value
    return struct.pack("<HH", group, elem) + vr + struct.pack("<H", len(value)) + value


def _ui(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw  # UI pads with NUL (PS3.5 9.1)


def _text(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b" " if len(raw) % 2 else raw  # other string VRs pad with space


def _meta_bytes(sop_class: str, sop_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information (PS3.10 7.1), explicit VR little endian."""
    body = b"".join(
        (
            struct.pack("<HH", 0x0002, 0x0001) + b"OB\0\0" + struct.pack("<I", 2) + b"\0\1",  # (0002,0001)
            _short_element(0x0002, 0x0002, b"UI", _ui(sop_class), False),  # (0002,0002)
            _short_element(0x0002, 0x0003, b"UI", _ui(sop_uid), False),  # (0002,0003)
            _short_element(0x0002, 0x0010, b"UI", _ui(transfer_syntax), False),  # (0002,0010)
            _short_element(0x0002, 0x0012, b"UI", _ui(_IMPLEMENTATION_CLASS_UID), False),  # (0002,0012)
            _short_element(0x0002, 0x0013, b"SH", _text(_IMPLEMENTATION_VERSION), False),  # (0002,0013)
        )
    )
    length = _short_element(0x0002, 0x0000, b"UL", struct.pack("<I", len(body)), False)  # (0002,0000)
    return bytes(128) + b"DICM" + length + body


@dataclass(frozen=True)
class _TinyTemplate:
    """A series' elements pre-encoded around the two that change per instance."""

    head: bytes  # tags < (0008,0018)
    middle: bytes  # (0008,0018) < tags < (0020,0013)
    tail: bytes  # tags > (0020,0013)
    implicit: bool

    @classmethod
    def build(cls, series_ds: Dataset, transfer_syntax: str) -> _TinyTemplate:
        implicit = transfer_syntax == ImplicitVRLittleEndian
        encodings = convert_encodings(series_ds.get("SpecificCharacterSet"))
        parts: dict[str, list[bytes]] = {"head": [], "middle": [], "tail": []}
        for elem in series_ds:  # iterates in tag order
            fp = DicomBytesIO()
            fp.is_little_endian = True
            fp.is_implicit_VR = implicit
            write_data_element(fp, elem, encodings)
            where = "head" if elem.tag < 0x00080018 else "middle" if elem.tag < 0x00200013 else "tail"
            parts[where].append(fp.getvalue())
        return cls(b"".join(parts["head"]), b"".join(parts["middle"]), b"".join(parts["tail"]), implicit)

    def encode(self, sop_uid: str, instance_number: int) -> bytes:
        return b"".join(
            (
                self.head,
                _short_element(0x0008, 0x0018, b"UI", _ui(sop_uid), self.implicit),  # (0008,0018)
                self.middle,
                _short_element(
                    0x0020, 0x0013, b"IS", _text(str(instance_number)), self.implicit
                ),  # (0020,0013)
                self.tail,
            )
        )


# --------------------------------------------------------------------------------------------------
# Writer


@dataclass
class _Writer:
    root: Path
    seed: int
    matrix: int
    tiny: bool
    files: int = 0
    total_bytes: int = 0

    def write(self, ds: Dataset, path: Path) -> None:
        ds.save_as(path, enforce_file_format=True)
        self.files += 1
        self.total_bytes += path.stat().st_size

    def write_bytes(self, data: bytes, path: Path) -> None:
        path.write_bytes(data)
        self.files += 1
        self.total_bytes += len(data)

    def study(
        self, index: int, spec: _Profile, budget: int, cycle: int, matrix: int | None = None
    ) -> GeneratedStudy:
        """Write one study of ``budget`` instances following ``spec``."""
        seed = self.seed
        rng = random.Random(f"{seed}:study:{index}")
        prng = random.Random(f"{seed}:patient:{spec.key}:{cycle % 2}")
        study_uid = uid_for(seed, "study", index)
        study_dir = f"study-{index + 1:03d}"
        patient_id = f"SYN{(_PROFILES.index(spec) if spec in _PROFILES else 99):02d}{cycle % 2:02d}"
        accession = f"ACC{rng.randrange(10**6, 10**7)}" if spec.accession else None
        study_date = f"{rng.randrange(2019, 2025)}{rng.randrange(1, 13):02d}{rng.randrange(1, 29):02d}"
        start_s = rng.randrange(7 * 3600, 18 * 3600)
        study_time = _tm(start_s, rng.randrange(10**6) if rng.random() < 0.5 else None)
        birth = f"{prng.randrange(1930, 2005)}{prng.randrange(1, 13):02d}{prng.randrange(1, 29):02d}"

        # Study and patient level, shared by every instance of the study
        common = Dataset()
        if spec.charset:
            common.SpecificCharacterSet = _charset_value(spec.charset)  # (0008,0005)
        common.StudyInstanceUID = study_uid  # (0020,000D)
        common.StudyDate = study_date  # (0008,0020)
        common.StudyTime = study_time  # (0008,0030)
        common.PatientName = spec.patient_name  # (0010,0010)
        common.PatientID = patient_id  # (0010,0020)
        common.AccessionNumber = accession or ""  # (0008,0050), type 2
        if not self.tiny:
            common.IssuerOfPatientID = "SYNTH-HOSP"  # (0010,0021)
            q = Dataset()
            q.UniversalEntityID = uid_for(seed, "patient-issuer")  # (0040,0032)
            q.UniversalEntityIDType = "ISO"  # (0040,0033)
            common.IssuerOfPatientIDQualifiersSequence = DicomSequence([q])  # (0010,0024)
            common.PatientBirthDate = birth  # (0010,0030)
            common.PatientSex = spec.patient_sex  # (0010,0040)
            if spec.timezone is not None:
                common.TimezoneOffsetFromUTC = spec.timezone  # (0008,0201)
            if accession is not None:
                issuer = Dataset()
                issuer.LocalNamespaceEntityID = "SYNTH-RIS"  # (0040,0031)
                if spec.accession_uid:
                    issuer.UniversalEntityID = uid_for(seed, "accession-issuer")  # (0040,0032)
                    issuer.UniversalEntityIDType = "ISO"  # (0040,0033)
                common.IssuerOfAccessionNumberSequence = DicomSequence([issuer])  # (0008,0051)
            common.StudyID = f"{index + 1:04d}"  # (0020,0010)
            common.StudyDescription = spec.description  # (0008,1030)
            common.ReferringPhysicianName = spec.referring  # (0008,0090)
            common.NameOfPhysiciansReadingStudy = list(spec.readers)  # (0008,1060)
            common.ProcedureCodeSequence = DicomSequence([_code(*spec.procedure)])  # (0008,1032)
            common.ReasonForTheRequestedProcedure = spec.reason  # (0040,1002)
            common.InstitutionName = "Synthetic Hospital"  # (0008,0080)
            common.Manufacturer = "SYNTHETIC"  # (0008,0070)

        plan = _plan_study(spec, budget)
        series_out: list[GeneratedSeries] = []
        image_refs: list[tuple[str, str, str]] = []  # (series uid, sop class, sop uid) for SR/KO evidence
        for s_index, (sspec, count) in enumerate(plan):
            series_uid = uid_for(seed, "series", index, s_index)
            series_dir = f"{study_dir}/series-{s_index + 1:02d}"
            series_ds = Dataset()
            series_ds.update(common)
            series_ds.Modality = sspec.modality  # (0008,0060)
            series_ds.SeriesInstanceUID = series_uid  # (0020,000E)
            series_ds.SeriesNumber = s_index + 1  # (0020,0011)
            series_ds.SOPClassUID = sspec.sop_class  # (0008,0016)
            series_start = start_s + 60 * (s_index + 1)
            if not self.tiny:
                series_ds.SeriesDescription = sspec.description  # (0008,103E)
                series_ds.SeriesDate = study_date  # (0008,0021)
                series_ds.SeriesTime = _tm(series_start)  # (0008,0031)
                if sspec.body_part:
                    series_ds.BodyPartExamined = sspec.body_part  # (0018,0015)
                if sspec.laterality:
                    series_ds.Laterality = sspec.laterality  # (0020,0060)
                if spec.performing:
                    series_ds.PerformingPhysicianName = list(spec.performing)  # (0008,1050)
                if spec.operators:
                    series_ds.OperatorsName = list(spec.operators)  # (0008,1070)
            frames = sspec.frames
            (self.root / series_dir).mkdir(parents=True, exist_ok=True)
            if self.tiny:
                template = _TinyTemplate.build(series_ds, sspec.transfer_syntax)
                for i in range(count):
                    sop_uid = uid_for(seed, "instance", index, s_index, i)
                    data = _meta_bytes(sspec.sop_class, sop_uid, sspec.transfer_syntax)
                    data += template.encode(sop_uid, i + 1)
                    self.write_bytes(data, self.root / series_dir / f"inst-{i + 1:05d}.dcm")
                series_out.append(
                    GeneratedSeries(
                        series_uid,
                        sspec.modality,
                        sspec.sop_class,
                        sspec.transfer_syntax,
                        count,
                        1,
                        series_dir,
                    )
                )
                continue
            for i in range(count):
                sop_uid = uid_for(seed, "instance", index, s_index, i)
                ts = sspec.transfer_syntax
                if sspec.big_endian_first and cycle == 0 and i == 0:
                    ts = ExplicitVRBigEndian
                ds = Dataset()
                ds.update(series_ds)
                ds.file_meta = _file_meta(sspec.sop_class, sop_uid, ts)
                ds.SOPInstanceUID = sop_uid  # (0008,0018)
                ds.InstanceNumber = i + 1  # (0020,0013)
                ds.ContentDate = study_date  # (0008,0023)
                ds.ContentTime = _tm(series_start + i)  # (0008,0033)
                if sspec.kind == "image":
                    self._image(ds, sspec, i, ts, matrix or self.matrix)
                elif sspec.kind == "sr":
                    self._sr(ds, image_refs)
                else:
                    self._ko(ds, image_refs)
                self.write(ds, self.root / series_dir / f"inst-{i + 1:05d}.dcm")
                if sspec.kind == "image" and len(image_refs) < 2:
                    image_refs.append((series_uid, sspec.sop_class, sop_uid))
            series_out.append(
                GeneratedSeries(
                    series_uid,
                    sspec.modality,
                    sspec.sop_class,
                    sspec.transfer_syntax,
                    count,
                    frames,
                    series_dir,
                )
            )
        return GeneratedStudy(
            study_uid=study_uid,
            profile=spec.key,
            specific_character_set="\\".join(spec.charset),
            patient_name=spec.patient_name,
            patient_id=patient_id,
            accession_number=accession,
            timezone_offset=None if self.tiny else spec.timezone,
            series=tuple(series_out),
            directory=study_dir,
        )

    def _image(self, ds: Dataset, sspec: _SeriesSpec, i: int, ts: str, matrix: int) -> None:
        """Image Pixel module (PS3.3 C.7.6.3) and a few acquisition attributes."""
        ds.ImageType = list(sspec.image_type)  # (0008,0008)
        ds.SamplesPerPixel = 1  # (0028,0002)
        ds.PhotometricInterpretation = "MONOCHROME2"  # (0028,0004)
        ds.Rows = matrix  # (0028,0010)
        ds.Columns = matrix  # (0028,0011)
        ds.BitsAllocated = sspec.bits  # (0028,0100)
        ds.BitsStored = 12 if sspec.bits == 16 else 8  # (0028,0101)
        ds.HighBit = ds.BitsStored - 1  # (0028,0102)
        ds.PixelRepresentation = 0  # (0028,0103)
        if sspec.modality in {"CT", "MR", "PT", "NM"}:
            ds.PixelSpacing = [0.7, 0.7]  # (0028,0030)
            ds.SliceThickness = 1.0  # (0018,0050)
            ds.ImagePositionPatient = [-100.0, -100.0, round(-50.0 + i * 1.0, 1)]  # (0020,0032)
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]  # (0020,0037)
        if sspec.modality == "CT":
            ds.RescaleIntercept = -1024  # (0028,1052)
            ds.RescaleSlope = 1  # (0028,1053)
            ds.KVP = 120  # (0018,0060)
        if sspec.modality == "MG" and sspec.laterality:
            ds.ImageLaterality = sspec.laterality  # (0020,0062)
            ds.ViewPosition = "CC" if i % 2 == 0 else "MLO"  # (0018,5101)
        if sspec.frames > 1:
            ds.NumberOfFrames = sspec.frames  # (0028,0008)
            ds.FrameTime = 33.3  # (0018,1063)
            ds.FrameIncrementPointer = 0x00181063  # (0028,0009) -> Frame Time
        big = ts == ExplicitVRBigEndian
        data = _pixels(matrix, matrix, sspec.bits, sspec.frames, i, big)
        ds.PixelData = data  # (7FE0,0010)
        ds["PixelData"].VR = "OW" if sspec.bits == 16 else "OB"

    def _sr(self, ds: Dataset, refs: list[tuple[str, str, str]]) -> None:
        """Basic Text SR document (PS3.3 A.35.1) with a title and one TEXT finding."""
        ds.ValueType = "CONTAINER"  # (0040,A040)
        # ImagingStudy.series.instance.title <- (0040,A043) > (0008,0104)
        ds.ConceptNameCodeSequence = DicomSequence([_code("LN", "18748-4", "Diagnostic imaging report")])
        ds.ContinuityOfContent = "SEPARATE"  # (0040,A050)
        ds.CompletionFlag = "COMPLETE"  # (0040,A491)
        ds.VerificationFlag = "UNVERIFIED"  # (0040,A493)
        finding = Dataset()
        finding.RelationshipType = "CONTAINS"  # (0040,A010)
        finding.ValueType = "TEXT"
        finding.ConceptNameCodeSequence = DicomSequence([_code("DCM", "121071", "Finding")])
        finding.TextValue = "No acute findings. Synthetic report."  # (0040,A160)
        ds.ContentSequence = DicomSequence([finding])  # (0040,A730)
        ds.CurrentRequestedProcedureEvidenceSequence = self._evidence(ds, refs)  # (0040,A375)

    def _ko(self, ds: Dataset, refs: list[tuple[str, str, str]]) -> None:
        """Key Object Selection document (PS3.3 A.59) referencing the study's first images."""
        ds.ValueType = "CONTAINER"
        ds.ConceptNameCodeSequence = DicomSequence([_code("DCM", "113000", "Of Interest")])
        ds.ContinuityOfContent = "SEPARATE"
        items = []
        for _series_uid, sop_class, sop_uid in refs:
            ref = Dataset()
            ref.ReferencedSOPClassUID = sop_class  # (0008,1150)
            ref.ReferencedSOPInstanceUID = sop_uid  # (0008,1155)
            item = Dataset()
            item.RelationshipType = "CONTAINS"
            item.ValueType = "IMAGE"
            item.ReferencedSOPSequence = DicomSequence([ref])  # (0008,1199)
            items.append(item)
        ds.ContentSequence = DicomSequence(items)
        ds.CurrentRequestedProcedureEvidenceSequence = self._evidence(ds, refs)

    @staticmethod
    def _evidence(ds: Dataset, refs: list[tuple[str, str, str]]) -> DicomSequence:
        by_series: dict[str, list[Dataset]] = {}
        for series_uid, sop_class, sop_uid in refs:
            ref = Dataset()
            ref.ReferencedSOPClassUID = sop_class
            ref.ReferencedSOPInstanceUID = sop_uid
            by_series.setdefault(series_uid, []).append(ref)
        series_items = []
        for series_uid, sops in by_series.items():
            s = Dataset()
            s.SeriesInstanceUID = series_uid
            s.ReferencedSOPSequence = DicomSequence(sops)
            series_items.append(s)
        study = Dataset()
        study.StudyInstanceUID = ds.StudyInstanceUID
        study.ReferencedSeriesSequence = DicomSequence(series_items)  # (0008,1115)
        return DicomSequence([study] if series_items else [])


# --------------------------------------------------------------------------------------------------
# Public API


def generate(
    out: Path,
    *,
    studies: int,
    files: int,
    seed: int = 1,
    ct_series: int = 0,
    tiny: bool = False,
    matrix: int = _DEFAULT_MATRIX,
) -> GeneratedCorpus:
    """Write a synthetic corpus under ``out`` and describe what was written.

    Parameters
    ----------
    out:
        Target folder; created if missing. Existing files with the same names are overwritten.
    studies:
        Number of studies cycling through the profiles (0 allowed, e.g. with ``ct_series`` alone).
    files:
        Total number of files for those studies, spread evenly; must be >= ``studies``.
    seed:
        Determines every UID and every invented value; the same arguments give the same bytes.
    ct_series:
        If > 0, add one more study with a single CT series of this many 512x512 16-bit images.
    tiny:
        Minimal headers (identity, patient, modality, numbers), no pixel data: fast to write.
    matrix:
        Rows and columns of the small images (the CT series is always 512x512).

    Returns
    -------
    GeneratedCorpus
        Counts and per-study expectations.

    Raises
    ------
    ValueError
        If the counts are negative, or ``files < studies``, or ``files > 0`` without studies.
    """
    if studies < 0 or files < 0 or ct_series < 0:
        raise ValueError(f"studies ({studies}), files ({files}) and ct_series ({ct_series}) must be >= 0")
    if files < studies or (files and not studies):
        raise ValueError(f"files ({files}) must be >= studies ({studies}) and > 0 only with studies")
    if not 1 <= matrix <= 1024:
        raise ValueError(f"matrix ({matrix}) must be between 1 and 1024")
    out.mkdir(parents=True, exist_ok=True)
    writer = _Writer(root=out, seed=seed, matrix=matrix, tiny=tiny)
    written: list[GeneratedStudy] = []
    base, extra = divmod(files, studies) if studies else (0, 0)
    for index in range(studies):
        cycle, p = divmod(index, len(_PROFILES))
        written.append(writer.study(index, _PROFILES[p], base + (1 if index < extra else 0), cycle))
    if ct_series:
        written.append(writer.study(studies, _CT_PROFILE, ct_series, 0, matrix=_CT_MATRIX))
    return GeneratedCorpus(
        root=out,
        seed=seed,
        studies=tuple(written),
        files=writer.files,
        total_bytes=writer.total_bytes,
        tiny=tiny,
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m samples.generate",
        description="Write synthetic DICOM Part-10 studies (invented patients, no real PHI).",
    )
    p.add_argument("--out", type=Path, required=True, help="target folder")
    p.add_argument(
        "--studies",
        type=int,
        default=None,
        help=f"number of studies (default {_DEFAULT_STUDIES}; {_SMALL_STUDIES} with --small)",
    )
    p.add_argument(
        "--files",
        type=int,
        default=None,
        help=f"total files over those studies (default {_DEFAULT_FILES}; {_SMALL_FILES} with --small)",
    )
    p.add_argument(
        "--small",
        action="store_true",
        help=f"the committed sample set: {_SMALL_STUDIES} studies, {_SMALL_FILES} files, "
        f"{_SMALL_MATRIX}x{_SMALL_MATRIX} images",
    )
    p.add_argument(
        "--ct-series",
        type=int,
        default=0,
        metavar="N",
        help="add one study with an N-instance 512x512 16-bit CT series "
        "(alone unless --studies/--files are given)",
    )
    p.add_argument("--seed", type=int, default=1, help="seed for UIDs and invented values (default 1)")
    p.add_argument("--tiny", action="store_true", help="minimal headers and no pixels (for very large runs)")
    p.add_argument("--matrix", type=int, default=None, help="rows/columns of the small images (default 64)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    args = _parser().parse_args(argv)
    studies, files, matrix = args.studies, args.files, args.matrix
    if args.small:
        studies = _SMALL_STUDIES if studies is None else studies
        files = _SMALL_FILES if files is None else files
        matrix = _SMALL_MATRIX if matrix is None else matrix
    elif args.ct_series and studies is None and files is None:
        studies, files = 0, 0
    studies = _DEFAULT_STUDIES if studies is None else studies
    files = max(_DEFAULT_FILES, studies) if files is None else files
    try:
        corpus = generate(
            args.out,
            studies=studies,
            files=files,
            seed=args.seed,
            ct_series=args.ct_series,
            tiny=args.tiny,
            matrix=_DEFAULT_MATRIX if matrix is None else matrix,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(
            f"wrote {corpus.files} files ({corpus.total_bytes / 1e6:.2f} MB) in "
            f"{len(corpus.studies)} studies to {corpus.root}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
