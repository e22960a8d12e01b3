// A real OpenID Provider for jitgate's tests: the certified `oidc-provider` package,
// configured for local use only. Never deploy this: every login name is accepted and
// every password is ignored (devInteractions).
//
//   node tests/idp/server.js [--port 0] [--redirect-uris '["http://127.0.0.1:8080/cb"]']
//
// Options (argv wins over the environment):
//   --port N / IDP_PORT                         0 (default): the OS picks a free port
//   --redirect-uris JSON / IDP_REDIRECT_URIS    redirect URIs of the login clients
//   --post-logout-redirect-uris JSON / IDP_POST_LOGOUT_REDIRECT_URIS (default: redirect URIs)
//   --client-secret S / IDP_CLIENT_SECRET       secret of the confidential clients
//   --groups JSON / IDP_GROUPS                  {"login": ["group", ...]} for the groups claim
//   --exit-with-stdin                           stop when stdin closes (the test runner died)
//
// When it listens it prints one JSON line on stdout and nothing else there:
//   {"ready":true,"issuer":"http://127.0.0.1:PORT","port":PORT,"kids":{...},...}
//
// Test-only endpoints (under /__test/, outside the provider):
//   POST /__test/rotate[?retire=1]  new RS256 and ES256 keys (new kids) sign from now on;
//                                   the old keys stay published unless retire=1
//   GET  /__test/stats              {"jwks_requests": n, "kids": {...}}
//   POST /__test/stats/reset        sets jwks_requests back to 0
//   POST /__test/jwks?status=503    the JWKS endpoint answers 503 until ?status=200

import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { createServer } from 'node:http';
import { parseArgs } from 'node:util';

import Provider from 'oidc-provider';

const { values: args } = parseArgs({
  options: {
    port: { type: 'string' },
    'redirect-uris': { type: 'string' },
    'post-logout-redirect-uris': { type: 'string' },
    'client-secret': { type: 'string' },
    groups: { type: 'string' },
    'exit-with-stdin': { type: 'boolean' },
  },
});

function option(name, envName, fallback) {
  return args[name] ?? process.env[envName] ?? fallback;
}

function jsonOption(name, envName, fallback) {
  const raw = option(name, envName, undefined);
  if (raw === undefined) return fallback;
  try {
    return JSON.parse(raw);
  } catch (err) {
    console.error(`--${name} / ${envName}: not JSON: ${err.message}`);
    process.exit(2);
  }
}

const port = Number(option('port', 'IDP_PORT', '0'));
const redirectUris = jsonOption('redirect-uris', 'IDP_REDIRECT_URIS', ['http://127.0.0.1/callback']);
const postLogoutRedirectUris = jsonOption(
  'post-logout-redirect-uris', 'IDP_POST_LOGOUT_REDIRECT_URIS', redirectUris,
);
const clientSecret = option('client-secret', 'IDP_CLIENT_SECRET', 'jitgate-test-client-secret');
const groupsByLogin = jsonOption('groups', 'IDP_GROUPS', {
  alice: ['eng'],
  bob: ['approvers'],
  sam: ['security'],
});

// Resource indicators the client_credentials grant can ask for. Their access tokens are
// JWTs whose `aud` is the resource; the suffix picks the signing algorithm so tests can
// have both an RS256 and an ES256 token without a browser.
const RESOURCES = {
  'urn:jitgate:api': 'RS256',
  'urn:jitgate:api:es256': 'ES256',
};

let generation = 0;

function newSigningKeys() {
  // Every generation gets fresh keys and readable kids, so a test can tell which key
  // signed a token from its header alone.
  generation += 1;
  const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ format: 'jwk' });
  const ec = generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey.export({ format: 'jwk' });
  const tag = `${generation}-${randomBytes(4).toString('hex')}`;
  return [
    { ...rsa, kid: `rs256-${tag}`, alg: 'RS256', use: 'sig' },
    { ...ec, kid: `es256-${tag}`, alg: 'ES256', use: 'sig' },
  ];
}

// Cookies must stay valid across a key rotation (which builds a new Provider), so their
// signing secret is made once per process.
const cookieKeys = [randomBytes(32).toString('hex')];

function buildProvider(issuer, signingKeys) {
  const clientBase = {
    client_secret: clientSecret,
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    redirect_uris: redirectUris,
    post_logout_redirect_uris: postLogoutRedirectUris,
    token_endpoint_auth_method: 'client_secret_basic',
  };
  return new Provider(issuer, {
    clients: [
      { ...clientBase, client_id: 'jitgate', id_token_signed_response_alg: 'RS256' },
      { ...clientBase, client_id: 'jitgate-es256', id_token_signed_response_alg: 'ES256' },
      {
        // A public client: PKCE is its only protection, as for a browser app.
        ...clientBase,
        client_id: 'jitgate-public',
        client_secret: undefined,
        token_endpoint_auth_method: 'none',
        id_token_signed_response_alg: 'RS256',
      },
      {
        client_id: 'jitgate-service',
        client_secret: clientSecret,
        grant_types: ['client_credentials'],
        response_types: [],
        redirect_uris: [],
        token_endpoint_auth_method: 'client_secret_basic',
      },
    ],
    jwks: { keys: signingKeys },
    cookies: { keys: cookieKeys },
    // PKCE (S256) is required of every client, confidential ones too.
    pkce: { required: () => true },
    scopes: ['openid', 'offline_access', 'email', 'groups', 'profile', 'api'],
    claims: {
      openid: ['sub'],
      email: ['email', 'email_verified'],
      groups: ['groups'],
      profile: ['name'],
    },
    // Put the scope's claims (email, groups) into the ID token itself: jitgate reads
    // identity from the ID token and never calls userinfo.
    conformIdTokenClaims: false,
    async findAccount(ctx, id) {
      return {
        accountId: id,
        async claims() {
          return {
            sub: id,
            name: id,
            email: `${id}@example.test`,
            email_verified: true,
            groups: groupsByLogin[id] ?? [],
          };
        },
      };
    },
    // Every client here is first-party: grant what it asks for without a consent page,
    // so a scripted login is a single form post.
    async loadExistingGrant(ctx) {
      const { client, session, result } = ctx.oidc;
      const grantId = result?.consent?.grantId || session.grantIdFor(client.clientId);
      if (grantId) {
        const existing = await ctx.oidc.provider.Grant.find(grantId);
        if (existing) return existing;
      }
      const grant = new ctx.oidc.provider.Grant({ clientId: client.clientId, accountId: session.accountId });
      grant.addOIDCScope('openid offline_access email groups profile');
      grant.addOIDCClaims(['email', 'email_verified', 'groups', 'name']);
      await grant.save();
      return grant;
    },
    features: {
      devInteractions: { enabled: true },
      clientCredentials: { enabled: true },
      rpInitiatedLogout: { enabled: true },
      introspection: { enabled: true },
      revocation: { enabled: true },
      resourceIndicators: {
        enabled: true,
        // Without a resource the authorization-code flow keeps its opaque (userinfo)
        // access token; client_credentials defaults to the RS256 API.
        defaultResource(ctx, client, oneOf) {
          if (oneOf) return oneOf;
          return ctx.oidc.route === 'token' && ctx.oidc.params.grant_type === 'client_credentials'
            ? 'urn:jitgate:api'
            : undefined;
        },
        useGrantedResource: () => true,
        async getResourceServerInfo(ctx, resource) {
          const alg = RESOURCES[resource];
          if (!alg) throw new Provider.errors.InvalidTarget(`unknown resource ${resource}`);
          return {
            audience: resource,
            scope: 'api',
            accessTokenTTL: 600,
            accessTokenFormat: 'jwt',
            jwt: { sign: { alg } },
          };
        },
      },
    },
    ttl: {
      AccessToken: 600,
      ClientCredentials: 600,
      IdToken: 600,
      Interaction: 600,
      Session: 3600,
      Grant: 3600,
      AuthorizationCode: 60,
      RefreshToken: 3600,
    },
  });
}

const state = {
  keys: newSigningKeys(),
  handler: null,
  issuer: null,
  jwksRequests: 0,
  jwksStatus: 200,
};

function kidsOf(keys) {
  // The newest key of each algorithm signs; that is the first one in the list.
  const kids = {};
  for (const key of keys) kids[key.alg] ??= key.kid;
  return kids;
}

function install(keys) {
  const provider = buildProvider(state.issuer, keys);
  provider.on('server_error', (ctx, err) => console.error('server_error', err));
  state.keys = keys;
  state.handler = provider.callback();
}

function sendJson(res, status, body) {
  res.writeHead(status, { 'content-type': 'application/json', 'cache-control': 'no-store' });
  res.end(JSON.stringify(body));
}

function testEndpoint(req, res, url) {
  const { pathname, searchParams } = url;
  if (req.method === 'POST' && pathname === '/__test/rotate') {
    // A new provider with the new keys first (they sign), the old ones after them (still
    // published, so tokens already issued keep verifying), unless told to retire them.
    const fresh = newSigningKeys();
    install(searchParams.get('retire') === '1' ? fresh : [...fresh, ...state.keys]);
    return sendJson(res, 200, { kids: kidsOf(state.keys), published: state.keys.map((k) => k.kid) });
  }
  if (req.method === 'GET' && pathname === '/__test/stats') {
    return sendJson(res, 200, {
      jwks_requests: state.jwksRequests,
      kids: kidsOf(state.keys),
      published: state.keys.map((k) => k.kid),
    });
  }
  if (req.method === 'POST' && pathname === '/__test/stats/reset') {
    state.jwksRequests = 0;
    return sendJson(res, 200, { jwks_requests: 0 });
  }
  if (req.method === 'POST' && pathname === '/__test/jwks') {
    state.jwksStatus = Number(searchParams.get('status') ?? '200');
    return sendJson(res, 200, { jwks_status: state.jwksStatus });
  }
  return sendJson(res, 404, { error: 'unknown test endpoint' });
}

const server = createServer((req, res) => {
  const url = new URL(req.url, state.issuer);
  if (url.pathname.startsWith('/__test/')) return testEndpoint(req, res, url);
  if (url.pathname === '/jwks') {
    state.jwksRequests += 1;
    if (state.jwksStatus !== 200) {
      return sendJson(res, state.jwksStatus, { error: 'jwks unavailable (test switch)' });
    }
  }
  return state.handler(req, res);
});

// Listen first, then build the provider: with --port 0 the issuer (which includes the
// port) is only known once the OS has picked one, and nobody else can take it meanwhile.
server.listen(port, '127.0.0.1', () => {
  const actual = server.address().port;
  state.issuer = `http://127.0.0.1:${actual}`;
  install(state.keys);
  process.stdout.write(`${JSON.stringify({
    ready: true,
    issuer: state.issuer,
    port: actual,
    pid: process.pid,
    kids: kidsOf(state.keys),
    clients: ['jitgate', 'jitgate-es256', 'jitgate-public', 'jitgate-service'],
    redirect_uris: redirectUris,
  })}\n`);
});

function shutdown() {
  server.close(() => process.exit(0));
  server.closeAllConnections();
  setTimeout(() => process.exit(0), 1000).unref();
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
if (args['exit-with-stdin']) {
  // The test process holds the other end of our stdin: if it dies without stopping us,
  // the pipe closes and we stop too instead of lingering on the port.
  process.stdin.on('end', shutdown);
  process.stdin.on('error', shutdown);
  process.stdin.resume();
}
