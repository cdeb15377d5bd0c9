// HBONE-style CONNECT server on Node's built-in http2 (nghttp2), for interop tests.
//
// Usage: node connect_server.js --cert C --key K --ca CA [--port 0] [--streams 1]
//                               [--timeout 20]
// Requires a client certificate from CA (mutual TLS 1.3, ALPN h2). For each CONNECT it
// answers 200, first sends one JSON line describing what it received (authority,
// forwarded, baggage, the client's certificate SAN), then echoes every byte and ends
// its side when the client ends its side. Non-CONNECT requests get 405.
// Prints "READY <port>" once listening; exits 0 after --streams streams finished, or
// exits 3 when --timeout seconds pass, so it can never outlive the test.
'use strict';
const http2 = require('http2');
const fs = require('fs');

function parseArgs(argv) {
  const args = { port: '0', streams: '1', timeout: '20' };
  for (let i = 0; i < argv.length; i += 2) {
    if (!argv[i].startsWith('--') || argv[i + 1] === undefined) {
      throw new Error(`bad argument ${argv[i]}`);
    }
    args[argv[i].slice(2)] = argv[i + 1];
  }
  return args;
}

const args = parseArgs(process.argv.slice(2));
const deadline = setTimeout(() => {
  console.error('connect_server: timeout');
  process.exit(3);
}, Number(args.timeout) * 1000);

const server = http2.createSecureServer({
  cert: fs.readFileSync(args.cert),
  key: fs.readFileSync(args.key),
  ca: fs.readFileSync(args.ca),
  requestCert: true,
  rejectUnauthorized: true,
  minVersion: 'TLSv1.3',
  ALPNProtocols: ['h2'],
  settings: { initialWindowSize: 4 * 1024 * 1024, maxFrameSize: 1024 * 1024 },
});

let finished = 0;
const wanted = Number(args.streams);

server.on('stream', (stream, headers) => {
  if (headers[':method'] !== 'CONNECT') {
    stream.respond({ ':status': 405 }, { endStream: true });
    return;
  }
  const peer = stream.session.socket.getPeerCertificate();
  stream.respond({ ':status': 200 });
  const info = {
    authority: headers[':authority'],
    forwarded: headers['forwarded'] || null,
    baggage: headers['baggage'] || null,
    peer_san: peer && peer.subjectaltname ? peer.subjectaltname : null,
    alpn: stream.session.alpnProtocol,
    tls: stream.session.socket.getProtocol(),
  };
  stream.write(JSON.stringify(info) + '\n');
  stream.on('data', (chunk) => stream.write(chunk));
  stream.on('end', () => stream.end());
  stream.on('error', (err) => console.error('connect_server: stream error', err.code));
  stream.on('close', () => {
    finished += 1;
    if (finished >= wanted) {
      clearTimeout(deadline);
      server.close();
      setTimeout(() => process.exit(0), 100);
    }
  });
});

server.on('tlsClientError', (err) => console.error('connect_server: tls error', err.code));

server.listen(Number(args.port), '127.0.0.1', () => {
  console.log(`READY ${server.address().port}`);
});
