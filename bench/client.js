#!/usr/bin/env node
// Load clients for the clipal benchmark (the precise sequential-latency
// client is bench/latency.py): raw TCP sockets, a minimal HTTP/1.1
// response parser, no npm dependencies.  Every mode is bounded in count and in
// time (deadline_s) and prints exactly one JSON object on stdout.
//
//   node bench/client.js '<json config>'
//
// config: {"mode": "load"|"sse"|"upload", "host": "127.0.0.1",
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

// -------------------------------------------------------------------- main --

async function main() {
  const cfg = JSON.parse(process.argv[2] || '{}');
  cfg.host = cfg.host || '127.0.0.1';
  const modes = { load: modeLoad, sse: modeSse, upload: modeUpload };
  const fn = modes[cfg.mode];
  if (!fn) { process.stderr.write(`unknown mode ${cfg.mode}\n`); process.exit(2); }
  const out = await fn(cfg);
  process.stdout.write(JSON.stringify(out) + '\n');
  process.exit(0);
}

process.on('SIGTERM', () => process.exit(1));
main().catch((e) => { process.stderr.write(String(e && e.stack || e) + '\n'); process.exit(1); });
