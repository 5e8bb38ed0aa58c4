#!/usr/bin/env node
// Fake upstream for the clipal benchmark: fast, dependency-free, loopback only.
//
//   node bench/upstream.js [--port 0] [--host 127.0.0.1] [--watch-stdin]
//
// Prints one line `READY <port>` on stdout once listening.  Routes (any prefix
// before /v1 is ignored, so `/codex/v1/...` works too if hit directly):
//   POST /v1/chat/completions  -> ~300-byte OpenAI-style JSON (Content-Length)
//   POST|GET /v1/stream?events=N&interval=MS&size=B
//                              -> text/event-stream, chunked; event 0 is sent at
//                                 once with the headers, then one event every MS
//                                 ms; the last event is `data: [DONE]`.
//   POST /v1/upload            -> reads the whole body, answers
//                                 {"bytes": n, "sha256": "<hex>"}
//   POST /v1/messages?events=N&interval=MS
//                              -> Anthropic Messages-style SSE (the agent phase):
//                                 reads the WHOLE request body first (as a real
//                                 provider does), then sends the head with
//                                 X-Bench-Body-Bytes / X-Bench-Body-Sha256 and
//                                 event 0 (message_start, which repeats them),
//                                 then one event every MS ms (default 40 events
//                                 50 ms apart); the last is `event: message_stop`.
//   GET  /health               -> {"status":"ok"}
// Sockets use TCP_NODELAY, so each write leaves at once.
'use strict';

const http = require('http');
const crypto = require('crypto');

function arg(name, dflt) {
  const i = process.argv.indexOf(name);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : dflt;
}

const HOST = arg('--host', '127.0.0.1');
const PORT = parseInt(arg('--port', '0'), 10);

const CHAT = Buffer.from(JSON.stringify({
  id: 'chatcmpl-bench0000000000000000000000',
  object: 'chat.completion',
  created: 1700000000,
  model: 'bench-model',
  choices: [{
    index: 0,
    message: { role: 'assistant', content: 'Hello from the clipal bench upstream. This is a short answer.' },
    logprobs: null,
    finish_reason: 'stop',
  }],
  usage: { prompt_tokens: 12, completion_tokens: 14, total_tokens: 26 },
}));

function drain(req, onData, onEnd) {
  req.on('data', onData || (() => {}));
  req.on('end', onEnd);
  req.on('error', () => {});
}

function handleChat(req, res) {
  drain(req, null, () => {
    res.writeHead(200, {
      'Content-Type': 'application/json',
      'Content-Length': CHAT.length,
      'x-request-id': 'req_bench',
    });
    res.end(CHAT);
  });
}

function handleStream(req, res, url) {
  const events = Math.max(1, Math.min(100000, parseInt(url.searchParams.get('events') || '50', 10) || 50));
  const interval = Math.max(0, Math.min(60000, parseInt(url.searchParams.get('interval') || '20', 10) || 0));
  const size = Math.max(0, Math.min(65536, parseInt(url.searchParams.get('size') || '0', 10) || 0));
  const pad = 'x'.repeat(size);
  let i = 0;
  let timer = null;
  let done = false;
  const finish = () => { done = true; if (timer) clearInterval(timer); timer = null; };
  res.on('close', finish);
  req.on('error', finish);

  const sendOne = () => {
    if (done) return;
    let ev;
    if (i === events - 1) {
      ev = 'data: [DONE]\n\n';
    } else {
      ev = 'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","choices":[{"index":0,' +
        '"delta":{"content":"tok' + i + pad + '"}}]}\n\n';
    }
    i += 1;
    if (i >= events) {
      finish();
      res.end(ev);
    } else {
      res.write(ev);
    }
  };

  drain(req, null, () => {
    res.writeHead(200, {
      'Content-Type': 'text/event-stream',
      'Cache-Control': 'no-cache',
      'X-Accel-Buffering': 'no',
    });
    sendOne(); // headers and the first event leave together
    if (!done) timer = setInterval(sendOne, interval);
  });
}

function handleUpload(req, res) {
  const h = crypto.createHash('sha256');
  let n = 0;
  drain(req, (chunk) => { n += chunk.length; h.update(chunk); }, () => {
    const body = Buffer.from(JSON.stringify({ bytes: n, sha256: h.digest('hex') }));
    res.writeHead(200, { 'Content-Type': 'application/json', 'Content-Length': body.length });
    res.end(body);
  });
}

// Anthropic-style stream: message_start, content_block_start, deltas,
// content_block_stop, message_delta, message_stop (always `events` events).
function handleMessages(req, res, url) {
  const events = Math.max(6, Math.min(10000, parseInt(url.searchParams.get('events') || '40', 10) || 40));
  const interval = Math.max(0, Math.min(60000, parseInt(url.searchParams.get('interval') || '50', 10) || 0));
  const h = crypto.createHash('sha256');
  let n = 0;
  let i = 0;
  let timer = null;
  let done = false;
  const finish = () => { done = true; if (timer) clearInterval(timer); timer = null; };
  res.on('close', finish);
  req.on('error', finish);
  const sse = (type, obj) => 'event: ' + type + '\ndata: ' + JSON.stringify(obj) + '\n\n';
  let sha = '';

  const sendOne = () => {
    if (done) return;
    let ev;
    if (i === 0) {
      ev = sse('message_start', { type: 'message_start', message: { id: 'msg_bench', type: 'message',
        role: 'assistant', model: 'bench-model', content: [], stop_reason: null,
        usage: { input_tokens: Math.round(n / 4), output_tokens: 1 } }, bench: { bytes: n, sha256: sha } });
    } else if (i === 1) {
      ev = sse('content_block_start', { type: 'content_block_start', index: 0,
        content_block: { type: 'text', text: '' } });
    } else if (i === events - 3) {
      ev = sse('content_block_stop', { type: 'content_block_stop', index: 0 });
    } else if (i === events - 2) {
      ev = sse('message_delta', { type: 'message_delta', delta: { stop_reason: 'end_turn', stop_sequence: null },
        usage: { output_tokens: events - 5 } });
    } else if (i === events - 1) {
      ev = sse('message_stop', { type: 'message_stop' });
    } else {
      ev = sse('content_block_delta', { type: 'content_block_delta', index: 0,
        delta: { type: 'text_delta', text: 'token ' + i + ' of the answer ' } });
    }
    i += 1;
    if (i >= events) {
      finish();
      res.end(ev);
    } else {
      res.write(ev);
    }
  };

  drain(req, (chunk) => { n += chunk.length; h.update(chunk); }, () => {
    sha = h.digest('hex');
    res.writeHead(200, {
      'Content-Type': 'text/event-stream; charset=utf-8',
      'Cache-Control': 'no-cache',
      'X-Accel-Buffering': 'no',
      'X-Bench-Body-Bytes': String(n),
      'X-Bench-Body-Sha256': sha,
      'request-id': 'req_bench',
    });
    sendOne(); // headers and message_start leave together
    if (!done) timer = setInterval(sendOne, interval);
  });
}

function notFound(req, res) {
  drain(req, null, () => {
    const body = Buffer.from('{"error":{"message":"not found","type":"not_found"}}');
    res.writeHead(404, { 'Content-Type': 'application/json', 'Content-Length': body.length });
    res.end(body);
  });
}

const server = http.createServer({ noDelay: true, keepAlive: true }, (req, res) => {
  const url = new URL(req.url, 'http://upstream');
  const p = url.pathname;
  if (p.endsWith('/v1/chat/completions')) return handleChat(req, res);
  if (p.endsWith('/v1/stream')) return handleStream(req, res, url);
  if (p.endsWith('/v1/upload')) return handleUpload(req, res);
  if (p.endsWith('/v1/messages')) return handleMessages(req, res, url);
  if (p === '/health') {
    return drain(req, null, () => {
      res.writeHead(200, { 'Content-Type': 'application/json', 'Content-Length': 15 });
      res.end('{"status":"ok"}');
    });
  }
  return notFound(req, res);
});

server.keepAliveTimeout = 120000;
server.headersTimeout = 125000;
server.requestTimeout = 0;
server.maxRequestsPerSocket = 0;
server.on('connection', (s) => s.setNoDelay(true));
server.on('clientError', (err, socket) => { try { socket.destroy(); } catch (e) { /* gone */ } });

server.listen({ host: HOST, port: PORT, backlog: 4096 }, () => {
  process.stdout.write('READY ' + server.address().port + '\n');
});

const stop = () => { server.close(); process.exit(0); };
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
// With --watch-stdin (bench/run.py passes it, with a pipe): exit when the
// parent goes away and the pipe closes.
if (process.argv.includes('--watch-stdin')) {
  process.stdin.on('end', stop);
  process.stdin.on('error', stop);
  process.stdin.resume();
}
