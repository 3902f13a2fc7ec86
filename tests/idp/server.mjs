// A real external OpenID provider for tests/test_external_issuer.py: oidc-provider, issuing RS256
// JWT access tokens for client_credentials with private_key_jwt client authentication.
//
//   node server.mjs   (configured by the environment)
//     IDP_PORT        loopback port to listen on; the issuer is http://127.0.0.1:<port>
//     IDP_CLIENT_ID   the one registered client
//     IDP_CLIENT_JWKS the client's public JWKS (JSON): what its client assertions are checked with
//     IDP_AUDIENCES   JSON list of resource indicators it issues tokens for (each becomes the `aud`);
//                     the first is the default resource
//     IDP_SCOPES      space-separated scopes the resource servers accept (e.g. "system/Patient.rs")
//
// Its signing key is made fresh at every start (kid printed), so restarting it rotates the key.
// Prints one JSON line {"issuer", "kid"} to stdout once it listens.
import { generateKeyPairSync, randomUUID } from 'node:crypto';
import { createServer } from 'node:http';

import Provider, { errors } from 'oidc-provider';

const port = Number(process.env.IDP_PORT);
const clientId = process.env.IDP_CLIENT_ID;
const clientJwks = JSON.parse(process.env.IDP_CLIENT_JWKS);
const audiences = JSON.parse(process.env.IDP_AUDIENCES);
const scope = process.env.IDP_SCOPES;
if (!port || !clientId || !audiences.length || !scope) {
  console.error('IDP_PORT, IDP_CLIENT_ID, IDP_CLIENT_JWKS, IDP_AUDIENCES and IDP_SCOPES are required');
  process.exit(2);
}

const issuer = `http://127.0.0.1:${port}`;
const kid = `idp-${randomUUID()}`;
const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingKey = { ...privateKey.export({ format: 'jwk' }), kid, alg: 'RS256', use: 'sig' };

const provider = new Provider(issuer, {
  clients: [{
    client_id: clientId,
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: 'private_key_jwt',
    token_endpoint_auth_signing_alg: 'RS256',
    jwks: clientJwks,
    scope,
  }],
  jwks: { keys: [signingKey] },
  scopes: scope.split(' '),
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => audiences[0],
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, resourceIndicator) => {
        if (!audiences.includes(resourceIndicator)) throw new errors.InvalidTarget();
        return {
          scope,
          audience: resourceIndicator,
          accessTokenTTL: 300,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'RS256' } },
        };
      },
    },
  },
});

const server = createServer(provider.callback());
server.listen(port, '127.0.0.1', () => {
  console.log(JSON.stringify({ issuer, kid }));
});
const stop = () => server.close(() => process.exit(0));
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
