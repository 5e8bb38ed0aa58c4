#!/usr/bin/env node
// Load clients for the clipal benchmark (the precise sequential-latency
// client is bench/latency.py): raw TCP sockets, a minimal HTTP/1.1
// response parser, no npm dependencies.  Every mode is bounded in count and in
// time (deadline_s) and prints exactly one JSON object on stdout.
//
//   node bench/client.js '<json config>'
//
// config: {"mode": "load"|"sse"|"upload"|"agent", "host": "127.0.0.1",
//          "port": N, "path": "/v1/...", ...mode options (see each function)}
'use strict';

const net = require('net');
const crypto = require('crypto');

const CRLF2 = Buffer.from('\r\n\r\n');
const NOW = () => Number(process.hrtime.bigint()) / 1e6; // ms, float

// ---------------------------------------------------------------- parsing --

// Incremental HTTP/1.1 response parser (Content-Length, chunked, or until EOF).
class ResponseParser {
  constructor(cb) {
    this.cb = cb; // {head(status, headers), body(buf), done(clean)}
    this.reset();
  }

  reset() {
    this.state = 'head';
    this.pending = null;
    this.remaining = 0;
    this.status = 0;
    this.headers = null;
  }

  _take(buf) {
    if (this.pending && this.pending.length) {
      buf = Buffer.concat([this.pending, buf]);
      this.pending = null;
    }
    return buf;
  }

  // Feed bytes; returns false once the response is complete (extra bytes are
  // ignored: the clients never pipeline).
  feed(buf) {
    buf = this._take(buf);
    let off = 0;
    while (off < buf.length || this.state === 'done0') {
      switch (this.state) {
        case 'head': {
          const i = buf.indexOf(CRLF2, off);
          if (i < 0) { this.pending = buf.subarray(off); return true; }
          const lines = buf.toString('latin1', off, i).split('\r\n');
          off = i + 4;
          this.status = parseInt(lines[0].split(' ')[1], 10);
          const h = {};
          for (let k = 1; k < lines.length; k++) {
            const c = lines[k].indexOf(':');
            if (c > 0) h[lines[k].slice(0, c).trim().toLowerCase()] = lines[k].slice(c + 1).trim();
          }
          this.headers = h;
          this.cb.head(this.status, h);
          if (this.status === 204 || this.status === 304 || (this.status >= 100 && this.status < 200)) {
            this.state = 'done0';
          } else if ((h['transfer-encoding'] || '').toLowerCase().includes('chunked')) {
            this.state = 'size';
          } else if (h['content-length'] !== undefined) {
            this.remaining = parseInt(h['content-length'], 10);
            this.state = this.remaining > 0 ? 'len' : 'done0';
          } else {
            this.state = 'eof';
          }
          break;
        }
        case 'len': {
          const n = Math.min(this.remaining, buf.length - off);
          this.cb.body(buf.subarray(off, off + n));
          off += n;
          this.remaining -= n;
          if (this.remaining === 0) this.state = 'done0';
          break;
        }
        case 'eof':
          this.cb.body(buf.subarray(off));
          return true;
        case 'size': {
          const i = buf.indexOf('\r\n', off, 'latin1');
          if (i < 0) { this.pending = buf.subarray(off); return true; }
          const size = parseInt(buf.toString('latin1', off, i).split(';')[0], 16);
          off = i + 2;
          if (size === 0) { this.state = 'trailer'; } else { this.remaining = size; this.state = 'data'; }
          break;
        }
        case 'data': {
          const n = Math.min(this.remaining, buf.length - off);
          this.cb.body(buf.subarray(off, off + n));
          off += n;
          this.remaining -= n;
          if (this.remaining === 0) { this.state = 'crlf'; }
          break;
        }
        case 'crlf':
          if (buf.length - off < 2) { this.pending = buf.subarray(off); return true; }
          off += 2;
          this.state = 'size';
          break;
        case 'trailer': {
          const i = buf.indexOf('\r\n', off, 'latin1');
          if (i < 0) { this.pending = buf.subarray(off); return true; }
          const empty = i === off;
          off = i + 2;
          if (empty) this.state = 'done0';
          break;
        }
        case 'done0':
          this.state = 'done';
          this.cb.done(true);
          return false;
        default:
          return false;
      }
    }
    return true;
  }

  // The socket closed: an EOF-delimited body ends cleanly, anything else not.
  eof() {
    if (this.state === 'eof') { this.state = 'done'; this.cb.done(true); return; }
    if (this.state !== 'done') { this.state = 'done'; this.cb.done(false); }
  }
}

// ------------------------------------------------------------------ helpers --

function pct(sorted, p) {
  if (!sorted.length) return null;
  const k = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[k];
}

function summary(values, scale = 1, digits = 3) {
  const s = Float64Array.from(values).sort();
  const r = (x) => (x === null ? null : +(x * scale).toFixed(digits));
  let sum = 0;
  for (const v of s) sum += v;
  return {
    n: s.length,
    min: r(s.length ? s[0] : null),
    p50: r(pct(s, 50)),
    p90: r(pct(s, 90)),
    p99: r(pct(s, 99)),
    max: r(s.length ? s[s.length - 1] : null),
    mean: r(s.length ? sum / s.length : null),
  };
}

function requestHead(cfg, method, path, bodyLen, extra) {
  let h = `${method} ${path} HTTP/1.1\r\nHost: ${cfg.host}:${cfg.port}\r\n` +
    'User-Agent: clipal-bench/1\r\nAuthorization: Bearer sk-client-bench-token\r\n';
  for (const [k, v] of Object.entries(extra || {})) h += `${k}: ${v}\r\n`;
  if (bodyLen !== null) h += `Content-Length: ${bodyLen}\r\n`;
  return h + '\r\n';
}

const CHAT_BODY = Buffer.from(JSON.stringify({
  model: 'bench-model', messages: [{ role: 'user', content: 'Say hello.' }], stream: false,
}));

function connect(cfg) {
  const s = net.connect({ host: cfg.host, port: cfg.port });
  s.setNoDelay(true);
  return s;
}

// ------------------------------------------------------------------ modes --

// Closed-loop load: `connections` keep-alive connections, each sending the next
// request when the previous answer is complete, for duration_s seconds.
// Used only when wrk is not installed.  options: connections, duration_s.
function modeLoad(cfg) {
  return new Promise((resolve) => {
    const conns = cfg.connections || 64;
    const durMs = (cfg.duration_s || 10) * 1000;
    const req = Buffer.concat([
      Buffer.from(requestHead(cfg, 'POST', cfg.path, CHAT_BODY.length, { 'Content-Type': 'application/json' })),
      CHAT_BODY]);
    const lat = [];
    let errors = 0, finished = false;
    const statuses = {};
    const start = NOW();
    const sockets = new Set();

    function finish() {
      if (finished) return;
      finished = true;
      for (const s of sockets) s.destroy();
      const el = (NOW() - start) / 1000;
      const st = summary(lat, 1, 3);
      resolve({ mode: 'load', connections: conns, duration_s: +el.toFixed(3), requests: lat.length,
        errors, statuses, rps: +(lat.length / el).toFixed(1),
        p50_ms: st.p50, p90_ms: st.p90, p99_ms: st.p99, max_ms: st.max, mean_ms: st.mean });
    }
    setTimeout(finish, durMs);

    function worker() {
      if (finished) return;
      const sock = connect(cfg);
      sockets.add(sock);
      let t0 = 0, inflight = false;
      const parser = new ResponseParser({
        head: (status) => { statuses[status] = (statuses[status] || 0) + 1; },
        body: () => {},
        done: (clean) => {
          inflight = false;
          if (!clean || parser.status < 200 || parser.status >= 300) errors++;
          else lat.push(NOW() - t0);
          send();
        },
      });
      function send() {
        if (finished || sock.destroyed) return;
        parser.reset();
        inflight = true;
        t0 = NOW();
        sock.write(req);
      }
      sock.on('connect', send);
      sock.on('data', (d) => parser.feed(d));
      sock.on('error', () => {});
      sock.on('close', () => {
        sockets.delete(sock);
        if (finished) return;
        if (inflight) { errors++; }
        setTimeout(worker, 5);
      });
    }
    for (let i = 0; i < conns; i++) worker();
  });
}

// `streams` concurrent SSE requests, all opened at once; per stream: time to
// first response byte, total time, and the largest gap between two
// consecutive SSE events.  options: streams, events, interval_ms, deadline_s.
function modeSse(cfg) {
  return new Promise((resolve) => {
    const n = cfg.streams || 200;
    const events = cfg.events || 50;
    const interval = cfg.interval_ms === undefined ? 20 : cfg.interval_ms;
    const sep = cfg.path.includes('?') ? '&' : '?';
    const path = `${cfg.path}${sep}events=${events}&interval=${interval}`;
    const body = Buffer.from(JSON.stringify({ model: 'bench-model', stream: true,
      messages: [{ role: 'user', content: 'Stream please.' }] }));
    const req = Buffer.concat([Buffer.from(requestHead(cfg, 'POST', path, body.length, {
      'Content-Type': 'application/json', Accept: 'text/event-stream' })), body]);

    const results = [];
    const sockets = new Set();
    let finished = false, closed = 0;
    const start = NOW();
    const deadline = setTimeout(() => finish(true), (cfg.deadline_s || 30) * 1000);

    function finish(timedOut) {
      if (finished) return;
      finished = true;
      clearTimeout(deadline);
      for (const s of sockets) s.destroy();
      const ok = results.filter((r) => r.ok);
      const statuses = {};
      const reasons = {};
      for (const r of results) {
        statuses[r.status] = (statuses[r.status] || 0) + 1;
        if (!r.ok) reasons[r.reason] = (reasons[r.reason] || 0) + 1;
      }
      const notFinished = n - results.length;
      if (notFinished) reasons['deadline'] = notFinished;
      resolve({ mode: 'sse', streams: n, events, interval_ms: interval,
        completed: ok.length, failed: n - ok.length, failure_reasons: reasons, statuses,
        timed_out: !!timedOut, wall_s: +((NOW() - start) / 1000).toFixed(3),
        ttfb_ms: summary(ok.map((r) => r.ttfb)),
        first_event_ms: summary(ok.map((r) => r.first)),
        total_ms: summary(ok.map((r) => r.total)),
        max_gap_ms: summary(ok.map((r) => r.gap)),
      });
    }

    function one() {
      const t0 = NOW();
      const sock = connect(cfg);
      sockets.add(sock);
      let ttfb = null, first = null, last = null, gap = 0, count = 0, prevNL = false;
      let done = false;
      const record = (ok, reason) => {
        if (done) return;
        done = true;
        const t = NOW();
        results.push({ ok, reason, status: parser.status, ttfb, first, total: t - t0, gap });
        sock.destroy();
      };
      const parser = new ResponseParser({
        head: () => {},
        body: (b) => {
          if (!b.length) return;
          const t = NOW();
          let k = 0;
          if (prevNL && b[0] === 10) { k++; }
          let i = b.indexOf('\n\n', 0, 'latin1');
          while (i >= 0) { k++; i = b.indexOf('\n\n', i + 2, 'latin1'); }
          prevNL = b[b.length - 1] === 10;
          for (let e = 0; e < k; e++) {
            if (last !== null) gap = Math.max(gap, t - last);
            else first = t - t0;
            last = t;
            count++;
          }
        },
        done: (clean) => {
          if (parser.status !== 200) record(false, `status ${parser.status}`);
          else if (!clean) record(false, 'unclean end');
          else if (count !== events) record(false, `got ${count}/${events} events`);
          else record(true, '');
        },
      });
      sock.on('connect', () => sock.write(req));
      sock.on('data', (d) => {
        if (ttfb === null) ttfb = NOW() - t0;
        parser.feed(d);
      });
      sock.on('error', (e) => { if (!done && ttfb === null) record(false, `socket ${e.code || e.message}`); });
      sock.on('close', () => {
        sockets.delete(sock);
        if (!done) { parser.eof(); if (!done) record(false, 'closed'); }
        closed++;
        if (closed === n) finish(false);
      });
    }
    for (let i = 0; i < n; i++) one();
  });
}

// `count` uploads of `size` bytes, spread over `concurrency` keep-alive
// connections; checks the byte count and sha256 the upstream echoes.
// options: count, size, concurrency, deadline_s.
function modeUpload(cfg) {
  return new Promise((resolve) => {
    const count = cfg.count || 20;
    const size = cfg.size || 10 * 1024 * 1024;
    const conc = Math.max(1, Math.min(cfg.concurrency || 1, count));
    const body = crypto.randomBytes(size);
    const want = crypto.createHash('sha256').update(body).digest('hex');
    const head = Buffer.from(requestHead(cfg, 'POST', cfg.path, size, { 'Content-Type': 'application/octet-stream' }));
    let started = 0, ok = 0, bad = 0, errors = 0, bytesUp = 0, finished = false, active = conc;
    const per = [];
    const statuses = {};
    const sockets = new Set();
    const start = NOW();
    const deadline = setTimeout(() => finish(true), (cfg.deadline_s || 60) * 1000);

    function finish(timedOut) {
      if (finished) return;
      finished = true;
      clearTimeout(deadline);
      for (const s of sockets) s.destroy();
      const el = (NOW() - start) / 1000;
      resolve({ mode: 'upload', count, size, concurrency: conc, ok, sha_mismatch: bad, errors,
        statuses, timed_out: !!timedOut, total_s: +el.toFixed(3),
        bytes_sent: ok * size, bytes_upstream: bytesUp,
        mb_per_s: +((bytesUp / 1048576) / el).toFixed(1), per_upload_ms: summary(per) });
    }

    function worker() {
      const sock = connect(cfg);
      sockets.add(sock);
      let t0 = 0, chunks = [], inflight = false;
      const parser = new ResponseParser({
        head: (status) => { statuses[status] = (statuses[status] || 0) + 1; },
        body: (b) => chunks.push(Buffer.from(b)),
        done: (clean) => {
          inflight = false;
          per.push(NOW() - t0);
          try {
            const j = JSON.parse(Buffer.concat(chunks).toString());
            if (parser.status === 200 && clean && j.bytes === size && j.sha256 === want) ok++;
            else bad++;
            if (typeof j.bytes === 'number') bytesUp += j.bytes;
          } catch (e) { errors++; }
          send();
        },
      });
      function send() {
        if (finished) return;
        if (started >= count) { sock.destroy(); return; }
        started++;
        chunks = [];
        parser.reset();
        inflight = true;
        t0 = NOW();
        sock.write(head);
        sock.write(body);
      }
      sock.on('connect', send);
      sock.on('data', (d) => parser.feed(d));
      sock.on('error', () => {});
      sock.on('close', () => {
        sockets.delete(sock);
        if (inflight) { inflight = false; errors++; }
        if (finished) return;
        if (started < count && errors <= count) { worker(); return; }
        if (--active === 0) finish(false);
      });
    }
    for (let i = 0; i < conc; i++) worker();
  });
}

// A Claude Code-like request body of exactly `size` bytes (ASCII JSON): a
// system prompt, a messages array of alternating user/assistant turns with
// long text content blocks, the last one a user turn, and "stream": true.
function agentBody(size) {
  const words = ('the function returns a promise that resolves once the file has been read and parsed ' +
    'so the caller can decide whether to retry the request or report the error to the user in the ' +
    'terminal while keeping the session state consistent across tool calls and edits to the code ').split(' ');
  let seed = size >>> 0;
  const rnd = () => { seed = (seed * 1103515245 + 12345) >>> 0; return seed >>> 8; };
  const prose = (n) => {
    const out = [];
    let len = 0;
    while (len < n) { const w = words[rnd() % words.length] || 'code'; out.push(w); len += w.length + 1; }
    return out.join(' ').slice(0, n).padEnd(n, '.');
  };
  const base = { model: 'claude-sonnet-4-5', max_tokens: 32000, stream: true,
    system: [{ type: 'text', text: 'You are Claude Code, a CLI coding agent. ' + prose(2000) }],
    messages: [] };
  const msgs = base.messages;
  const turn = Math.max(256, Math.min(16384, Math.floor(size / 24)));
  let k = 0;
  // Whole turns while there is room, then one last user turn padded to the exact size.
  for (;;) {
    const role = k % 2 === 0 ? 'user' : 'assistant';
    msgs.push({ role, content: [{ type: 'text', text: prose(turn) }] });
    k++;
    if (JSON.stringify(base).length + turn + 200 > size) break;
  }
  if (msgs[msgs.length - 1].role !== 'user') msgs.pop();
  const last = { role: 'user', content: [{ type: 'text', text: '' }] };
  msgs.push(last);
  const room = size - JSON.stringify(base).length;
  if (room < 0) throw new Error(`agent body: size ${size} too small`);
  last.content[0].text = prose(room);
  const buf = Buffer.from(JSON.stringify(base));
  if (buf.length !== size) throw new Error(`agent body: built ${buf.length} bytes, wanted ${size}`);
  return buf;
}

// Agent sessions (Claude Code-like): `sessions` concurrent keep-alive
// connections, each sending `requests` POSTs of a `size`-byte JSON body back to
// back, each answered with an SSE stream the upstream starts only after it has
// read the whole body.  Per request: TTFB (start of writing the request -> first
// response byte), total (-> end of the response), largest gap between events;
// checks status 200, the body bytes/sha256 the upstream echoes in its headers,
// every event, the terminal `event: message_stop`, a clean end.
// options: sessions, requests, size, events, interval_ms, deadline_s.
function modeAgent(cfg) {
  return new Promise((resolve) => {
    const sessions = cfg.sessions || 1;
    const perSession = cfg.requests || 1;
    const size = cfg.size || 50000;
    const events = cfg.events || 40;
    const interval = cfg.interval_ms === undefined ? 50 : cfg.interval_ms;
    const sep = cfg.path.includes('?') ? '&' : '?';
    const path = `${cfg.path}${sep}events=${events}&interval=${interval}`;
    const body = agentBody(size);
    const want = crypto.createHash('sha256').update(body).digest('hex');
    const req = Buffer.concat([Buffer.from(requestHead(cfg, 'POST', path, body.length, {
      'Content-Type': 'application/json', Accept: 'text/event-stream', 'anthropic-version': '2023-06-01' })), body]);
    const total = sessions * perSession;
    const results = [];
    const sockets = new Set();
    let finished = false, active = sessions, connects = 0;
    const start = NOW();
    const deadline = setTimeout(() => finish(true), (cfg.deadline_s || 60) * 1000);

    function finish(timedOut) {
      if (finished) return;
      finished = true;
      clearTimeout(deadline);
      for (const s of sockets) s.destroy();
      const ok = results.filter((r) => r.ok);
      const statuses = {}, reasons = {};
      for (const r of results) {
        statuses[r.status] = (statuses[r.status] || 0) + 1;
        if (!r.ok) reasons[r.reason] = (reasons[r.reason] || 0) + 1;
      }
      if (total - results.length) reasons.deadline = total - results.length;
      resolve({ mode: 'agent', size, sessions, requests_per_session: perSession, requests: total,
        events, interval_ms: interval, completed: ok.length, failed: total - ok.length,
        body_ok: results.filter((r) => r.bodyOk).length, failure_reasons: reasons, statuses,
        connections: connects, timed_out: !!timedOut, wall_s: +((NOW() - start) / 1000).toFixed(3),
        ttfb_ms: summary(ok.map((r) => r.ttfb)), total_ms: summary(ok.map((r) => r.total)),
        max_gap_ms: summary(ok.map((r) => r.gap)) });
    }

    function session() {
      let left = perSession;
      let sock = null, inflight = null;

      function open() {
        sock = connect(cfg);
        connects++;
        sockets.add(sock);
        const s = sock;
        s.on('connect', send);
        s.on('data', (d) => { if (inflight && s === sock) inflight.data(d); });
        s.on('error', () => {});
        s.on('close', () => {
          sockets.delete(s);
          if (s !== sock) return;
          sock = null;
          if (inflight) inflight.closed();
          else if (left > 0 && !finished) open(); // the server closed an idle keep-alive connection
        });
      }

      function end() {
        if (--active === 0) finish(false);
      }

      function send() {
        if (finished) return;
        if (left <= 0) { if (sock) sock.destroy(); end(); return; }
        if (!sock || sock.destroyed) { open(); return; }
        left--;
        const r = { ok: false, reason: '', status: 0, ttfb: null, total: null, gap: 0, bodyOk: false };
        let last = null, count = 0, prevNL = false, tail = '', done = false, keep = true;
        const t0 = NOW();
        const record = (ok, reason) => {
          if (done) return;
          done = true;
          inflight = null;
          r.ok = ok; r.reason = reason; r.total = NOW() - t0;
          results.push(r);
          if (!ok || !keep) { const s = sock; sock = null; if (s) s.destroy(); }
          if (left > 0) setImmediate(send); else { if (sock) sock.destroy(); end(); }
        };
        const parser = new ResponseParser({
          head: (status, h) => {
            r.status = status;
            r.bodyOk = h['x-bench-body-sha256'] === want && h['x-bench-body-bytes'] === String(size);
            keep = (h.connection || '').toLowerCase() !== 'close';
          },
          body: (b) => {
            if (!b.length) return;
            const t = NOW();
            let k = 0;
            if (prevNL && b[0] === 10) k++;
            let i = b.indexOf('\n\n', 0, 'latin1');
            while (i >= 0) { k++; i = b.indexOf('\n\n', i + 2, 'latin1'); }
            prevNL = b[b.length - 1] === 10;
            for (let e = 0; e < k; e++) {
              if (last !== null) r.gap = Math.max(r.gap, t - last);
              last = t;
              count++;
            }
            tail = (tail + b.toString('latin1', Math.max(0, b.length - 256))).slice(-256);
          },
          done: (clean) => {
            if (r.status !== 200) record(false, `status ${r.status}`);
            else if (!clean) record(false, 'unclean end');
            else if (!r.bodyOk) record(false, 'body bytes/sha256 mismatch at upstream');
            else if (count !== events) record(false, `got ${count}/${events} events`);
            else if (!tail.includes('event: message_stop')) record(false, 'no message_stop');
            else record(true, '');
          },
        });
        inflight = {
          data: (d) => { if (r.ttfb === null) r.ttfb = NOW() - t0; parser.feed(d); },
          closed: () => { parser.eof(); if (!done) record(false, r.ttfb === null ? 'closed before response' : 'closed'); },
        };
        sock.write(req);
      }
      open();
    }
    for (let i = 0; i < sessions; i++) session();
  });
}

// -------------------------------------------------------------------- main --

async function main() {
  const cfg = JSON.parse(process.argv[2] || '{}');
  cfg.host = cfg.host || '127.0.0.1';
  const modes = { load: modeLoad, sse: modeSse, upload: modeUpload, agent: modeAgent };
  const fn = modes[cfg.mode];
  if (!fn) { process.stderr.write(`unknown mode ${cfg.mode}\n`); process.exit(2); }
  const out = await fn(cfg);
  process.stdout.write(JSON.stringify(out) + '\n');
  process.exit(0);
}

process.on('SIGTERM', () => process.exit(1));
main().catch((e) => { process.stderr.write(String(e && e.stack || e) + '\n'); process.exit(1); });
