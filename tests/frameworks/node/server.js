// A Node.js HTTP server on the listening socket it inherits as fd 3 (LISTEN_FDS=1).
// Answers "release TAG pid PID", TAG being the name of the release directory it runs from.
//
// SIGTERM drains: stop accepting, answer every request that arrives with "Connection: close",
// close a connection only once it has been idle for IDLE_GRACE_MS, exit when none is left.
// http.Server#close() would close idle keep-alive connections at once, under a request that a
// client may be sending at that very moment; so the listener is closed the net.Server way.
'use strict';

const http = require('http');
const net = require('net');
const path = require('path');

const TAG = path.basename(__dirname);
const IDLE_GRACE_MS = 1000;
const busy = new Set();
const sockets = new Set();
let draining = false;

const server = http.createServer((req, res) => {
  const body = `release ${TAG} pid ${process.pid}\n`;
  const headers = {'Content-Type': 'text/plain', 'Content-Length': Buffer.byteLength(body)};
  if (draining) headers.Connection = 'close';
  res.writeHead(200, headers);
  res.end(body);
});

server.on('connection', (socket) => {
  sockets.add(socket);
  socket.on('close', () => { sockets.delete(socket); busy.delete(socket); });
});
server.on('request', (req, res) => {
  busy.add(req.socket);
  res.on('finish', () => {
    busy.delete(req.socket);
    if (draining) closeWhenIdle(req.socket);
  });
});

function closeWhenIdle(socket) {
  setTimeout(() => {
    if (busy.has(socket)) return;   // a request came: its response closes the connection
    socket.end();
  }, IDLE_GRACE_MS);
}

process.on('SIGTERM', () => {
  if (draining) return;
  draining = true;
  net.Server.prototype.close.call(server, () => process.exit(0));
  for (const socket of sockets) if (!busy.has(socket)) closeWhenIdle(socket);
});

if (process.env.LISTEN_FDS !== '1' || process.env.LISTEN_PID !== String(process.pid)) {
  console.error(`server.js: expected one listener as fd 3 (LISTEN_FDS=${process.env.LISTEN_FDS}, ` +
                `LISTEN_PID=${process.env.LISTEN_PID}, pid ${process.pid}); start it under cadenza`);
  process.exit(64);
}
server.listen({fd: 3}, () => console.log(`release ${TAG} listening on fd 3 (pid ${process.pid})`));
