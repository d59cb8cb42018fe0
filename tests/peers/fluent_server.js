#!/usr/bin/env node
// A real third-party Forward receiver for forwarder's integration tests: FluentServer from
// @fluent-org/logger (the Fluent project's Node.js library), on 127.0.0.1.
//
// Usage: node fluent_server.js '<json options>'   (or the JSON in $FLUENT_SERVER_OPTIONS)
//   {
//     "port": 0,                      // 0 picks a free port
//     "host": "127.0.0.1",
//     "security": {"serverHostname": "...", "sharedKey": "...",
//                  "authorize": false, "userDict": {"user": "password"}},
//                                     // "authorization" is accepted as a synonym of "authorize"
//     "tls": {"key": "...", "cert": "...", "ca": "...", "requestCert": false},
//                                     // key/cert/ca: a PEM text or the path of a PEM file
//     "ack": true                     // false: never answer {"ack": chunk} (see below)
//   }
//
// stdout, one JSON object per line:
//   {"listening": <port>}                                   once, when it accepts connections
//   {"tag": "...", "time": [sec, nsec] | <number>, "record": {...}}   per entry
//   {"acked": "<chunk id>"}                                 per ack sent
// stderr, one JSON object per line: {"auth_failure": "<reason>", "client_hostname": "..."},
// {"decode_error": "<message>"}, {"error": "..."}.
// It exits when its stdin closes, or on SIGTERM / SIGINT.
//
// The library always acks a message that carries a "chunk" option and offers no switch; "ack":
// false is done here by wrapping the library's protocol.encodeMessage so that an ack encodes to
// nothing. Auth failures are logged by wrapping protocol.checkPing. Both wrappers only observe
// or drop; the protocol handling itself is the library's.
"use strict";

const fs = require("fs");
const {FluentServer, EventTime} = require("@fluent-org/logger");
const protocol = require("@fluent-org/logger/build/src/protocol");

function readOptions() {
  const text = process.argv[2] || process.env.FLUENT_SERVER_OPTIONS || "{}";
  try {
    return JSON.parse(text);
  } catch (e) {
    fail(`options are not JSON: ${e.message}`);
  }
  return {};
}

function fail(message) {
  process.stderr.write(JSON.stringify({error: message}) + "\n");
  process.exit(2);
}

function pem(value) {
  if (value === undefined || value === null) {
    return undefined;
  }
  if (typeof value === "string" && value.includes("-----BEGIN")) {
    return value;
  }
  return fs.readFileSync(value);
}

function jsonValue(value) {
  if (value instanceof EventTime) {
    return [value.epoch, value.nano];
  }
  if (value instanceof Uint8Array) {
    // msgpack bin: shown as UTF-8 text (the records we test carry text).
    return Buffer.from(value.buffer, value.byteOffset, value.byteLength).toString("utf8");
  }
  if (typeof value === "bigint") {
    return value.toString();
  }
  if (Array.isArray(value)) {
    return value.map(jsonValue);
  }
  if (value !== null && typeof value === "object") {
    const out = {};
    for (const [k, v] of Object.entries(value)) {
      out[k] = jsonValue(v);
    }
    return out;
  }
  return value;
}

function emit(stream, object) {
  // Writes to pipes are synchronous on Linux, so nothing is lost at process.exit().
  stream.write(JSON.stringify(object) + "\n");
}

const options = readOptions();
const ack = options.ack !== false;

const originalCheckPing = protocol.checkPing;
protocol.checkPing = function checkPing(message, ...rest) {
  try {
    return originalCheckPing.call(this, message, ...rest);
  } catch (e) {
    emit(process.stderr, {auth_failure: e.message, client_hostname: String(message[1])});
    throw e;
  }
};

const originalParseTransport = protocol.parseTransport;
protocol.parseTransport = function parseTransport(message) {
  try {
    return originalParseTransport.call(this, message);
  } catch (e) {
    emit(process.stderr, {decode_error: e.message});
    throw e;
  }
};

const originalEncodeMessage = protocol.encodeMessage;
protocol.encodeMessage = function encodeMessage(message) {
  if (protocol.isAck(message)) {
    if (!ack) {
      return new Uint8Array(0);
    }
    emit(process.stdout, {acked: message.ack});
  }
  return originalEncodeMessage.call(this, message);
};

const serverOptions = {
  listenOptions: {host: options.host || "127.0.0.1", port: options.port || 0},
};
if (options.security) {
  const s = options.security;
  serverOptions.security = {
    serverHostname: s.serverHostname || "fluent-server-test",
    sharedKey: s.sharedKey || "",
    authorize: Boolean(s.authorize !== undefined ? s.authorize : s.authorization),
    userDict: s.userDict || {},
  };
}
if (options.tls) {
  const t = options.tls;
  serverOptions.tlsOptions = {
    key: pem(t.key),
    cert: pem(t.cert),
    ca: pem(t.ca),
    requestCert: Boolean(t.requestCert),
    rejectUnauthorized: Boolean(t.requestCert),
  };
}

const server = new FluentServer(serverOptions);
server.on("entry", (tag, time, record) => {
  emit(process.stdout, {tag, time: jsonValue(time), record: jsonValue(record)});
});

let stopping = false;
function shutdown() {
  if (stopping) {
    return;
  }
  stopping = true;
  process.exit(0);
}

process.on("SIGTERM", shutdown);
process.on("SIGINT", shutdown);
process.stdin.on("end", shutdown);
process.stdin.on("close", shutdown);
process.stdin.on("error", shutdown);
process.stdin.resume();

// The library attaches no "error" listener to its net/tls server (EADDRINUSE would crash it).
server.server.on("error", e => fail(`server error: ${e.message}`));

server
  .listen()
  .then(() => emit(process.stdout, {listening: server.port}))
  .catch(e => fail(`listen failed: ${e.message}`));
