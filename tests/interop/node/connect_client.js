// HBONE-style CONNECT client on Node's built-in http2 (nghttp2), for interop tests.
//
// Usage: node connect_client.js --cert C --key K --ca CA --port P --authority A
//                               [--bytes N] [--method CONNECT] [--timeout 20]
// Connects to 127.0.0.1:P with mutual TLS 1.3 (ALPN h2, server chain verified against
// CA; no hostname check, the SPIFFE ID is reported instead), sends one request, streams
// N bytes of a fixed pattern, half-closes, and reads until the server half-closes.
// Prints one JSON line with the status, byte counts, SHA-256 of what was sent and what
// came back, and the server's certificate SAN; exits 0. Exits 3 on --timeout.
'use strict';
const http2 = require('http2');
const fs = require('fs');
const crypto = require('crypto');

function parseArgs(argv) {
  const args = { bytes: '0', method: 'CONNECT', timeout: '20' };
  for (let i = 0; i < argv.length; i += 2) {
    if (!argv[i].startsWith('--') || argv[i + 1] === undefined) {
      throw new Error(`bad argument ${argv[i]}`);
    }
    args[argv[i].slice(2)] = argv[i + 1];
  }
  return args;
}

const args = parseArgs(process.argv.slice(2));
setTimeout(() => {
  console.error('connect_client: timeout');
  process.exit(3);
}, Number(args.timeout) * 1000);

const session = http2.connect(`https://127.0.0.1:${args.port}`, {
  cert: fs.readFileSync(args.cert),
  key: fs.readFileSync(args.key),
  ca: fs.readFileSync(args.ca),
  minVersion: 'TLSv1.3',
  ALPNProtocols: ['h2'],
  checkServerIdentity: () => undefined,
  settings: { initialWindowSize: 4 * 1024 * 1024, maxFrameSize: 1024 * 1024 },
});
session.on('error', (err) => {
  console.log(JSON.stringify({ error: err.code || String(err) }));
  process.exit(1);
});

const headers = { ':method': args.method, ':authority': args.authority };
if (args.method !== 'CONNECT') {
  headers[':scheme'] = 'https';
  headers[':path'] = '/';
}
const req = session.request(headers, { endStream: false });
const sentHash = crypto.createHash('sha256');
const recvHash = crypto.createHash('sha256');
let received = 0;
let status = null;
let responseHeaders = {};

req.on('response', (h) => {
  status = h[':status'];
  responseHeaders = h;
  if (status !== 200) {
    return;
  }
  // Stream a deterministic pattern, respecting back-pressure.
  const total = Number(args.bytes);
  const chunk = Buffer.alloc(64 * 1024);
  for (let i = 0; i < chunk.length; i += 1) chunk[i] = (i * 7 + 3) & 0xff;
  let sent = 0;
  const pump = () => {
    while (sent < total) {
      const piece = chunk.subarray(0, Math.min(chunk.length, total - sent));
      sent += piece.length;
      sentHash.update(piece);
      if (!req.write(piece)) {
        req.once('drain', pump);
        return;
      }
    }
    req.end();
  };
  pump();
});
req.on('data', (data) => {
  received += data.length;
  recvHash.update(data);
});
req.on('end', () => finish());
req.on('error', (err) => {
  console.log(JSON.stringify({ error: err.code || String(err), status }));
  process.exit(1);
});
req.on('close', () => finish());

let done = false;
function finish() {
  if (done) return;
  done = true;
  const peer = session.socket.getPeerCertificate();
  console.log(JSON.stringify({
    status,
    received,
    sent_sha256: sentHash.digest('hex'),
    received_sha256: recvHash.digest('hex'),
    server_san: peer && peer.subjectaltname ? peer.subjectaltname : null,
    rst_code: req.rstCode,
    response_headers: responseHeaders,
  }));
  session.close(() => process.exit(0));
  setTimeout(() => process.exit(0), 1000);
}
