/* eventpipe beacon: page views, clicks, scroll depth, rage clicks, hesitation,
 * forms and JS errors, batched to the collector's POST /v1/behavior.
 * <script src="https://COLLECTOR/v1/beacon.js" data-write-key="wk_..." async></script>
 * Options: data-respect-dnt="false", data-flush-interval="5000" (ms),
 * data-endpoint="https://..." (collector base URL, default: the script's).
 * eventpipe.consent({analytics: bool, anonymous: bool}): see README, Privacy. */
(function () {
  "use strict";
  var w = window, d = document, n = navigator;
  if (w.eventpipe && w.eventpipe.version) return; // included twice
  var noop = function () {};
  var api = { version: 1, track: noop, flush: noop, sessionId: noop, consent: noop };
  w.eventpipe = api;
  var tag = d.currentScript || d.querySelector("script[data-write-key]");
  var opt = (tag && tag.dataset) || {};
  if (!opt.writeKey) { if (w.console) console.warn("eventpipe: no data-write-key"); return; }
  if (opt.respectDnt !== "false" &&
      (n.doNotTrack === "1" || w.doNotTrack === "1" || n.globalPrivacyControl === true)) return;
  var base = (opt.endpoint || tag.src.replace(/\/v1\/beacon\.js([?#].*)?$/, "")).replace(/\/$/, "");
  var url = base + "/v1/behavior?k=" + encodeURIComponent(opt.writeKey);
  // mode: "wait" (shop config or consent pending: events held in memory), "on", "anon", "off".
  var mode = "wait", required = null, given = null, held = [];
  var interval = +opt.flushInterval > 0 ? +opt.flushInterval : 5000;
  var MAX_EVENTS = 200, MAX_BYTES = 60000, IDLE = 30 * 60 * 1000;
  var TYPES = "click scroll hover rage_click hesitation form_start form_abandon form_submit " +
    "error page_view time_on_element scroll_depth";
  var queue = [], bytes = 0, timer = 0, memSid = null, errors = 0;
  var utf8 = w.TextEncoder ? new TextEncoder() : null;

  function guard(fn) {
    return function (e) { try { fn(e); } catch (x) { /* never break the host page */ } };
  }
  function uuid() {
    var c = w.crypto;
    if (c && c.randomUUID) return c.randomUUID();
    var b = new Uint8Array(16);
    if (c && c.getRandomValues) c.getRandomValues(b);
    else for (var i = 0; i < 16; i++) b[i] = Math.random() * 256;
    b[6] = (b[6] & 15) | 64; b[8] = (b[8] & 63) | 128;
    var h = Array.prototype.map.call(b, function (x) { return (x + 256).toString(16).slice(1); }).join("");
    return h.slice(0, 8) + "-" + h.slice(8, 12) + "-" + h.slice(12, 16) + "-" + h.slice(16, 20) + "-" + h.slice(20);
  }
  // Session id: sessionStorage "id.lastActivity", renewed after 30 minutes idle.
  // Anonymous: in memory only, one page's session.
  function sid() {
    var now = Date.now(), s = memSid, id;
    if (mode !== "anon") try { s = sessionStorage.getItem("eventpipe.sid"); } catch (x) { s = memSid; }
    var parts = s ? s.split(".") : [];
    id = parts.length === 2 && now - +parts[1] < IDLE ? parts[0] : uuid();
    memSid = id + "." + now;
    if (mode !== "anon") try { sessionStorage.setItem("eventpipe.sid", memSid); } catch (x) { /* memory only */ }
    return id;
  }
  function path(el) {
    var out = [];
    for (; el && el.nodeType === 1 && el !== d.documentElement; el = el.parentElement) {
      var s = el.tagName.toLowerCase();
      if (el.id) s += "#" + el.id;
      var cls = typeof el.className === "string" ? el.className.trim().split(/\s+/).slice(0, 2) : [];
      if (cls[0]) s += "." + cls.join(".");
      out.unshift(s);
    }
    var p = out.join(" > ");
    return p.length > 512 ? p.slice(p.length - 512) : p;
  }
  function text(el) {
    if (/^(INPUT|TEXTAREA|SELECT)$/.test(el.tagName)) return null; // never values
    var t = (el.innerText || el.textContent || "").replace(/\s+/g, " ").trim();
    return t ? t.slice(0, 100) : null;
  }
  function describe(el) {
    return { element_path: path(el), element_type: el.tagName.toLowerCase(),
      element_text: text(el), component_id: el.id ? el.id.slice(0, 256) : null };
  }
  function elementOf(t) { return t && t.nodeType === 3 ? t.parentElement : t; }

  function track(type, extra) {
    if (mode === "off") return;
    if (mode === "wait") { // nothing stored or sent: held, with its time, until consent
      if (held.length < MAX_EVENTS) held.push([type, Object.assign({ timestamp: new Date().toISOString() }, extra)]);
      return;
    }
    var e = { event_id: uuid(), event_type: type, session_id: sid(),
      page_url: location.href.slice(0, 4096), timestamp: new Date().toISOString(),
      viewport_size: { width: w.innerWidth, height: w.innerHeight } };
    for (var k in extra) if (extra[k] != null && k !== "facts") e[k] = extra[k];
    if (extra && extra.facts && mode !== "anon") e.metadata = Object.assign({}, extra.facts, e.metadata);
    var json = JSON.stringify(e), size = utf8 ? utf8.encode(json).length : json.length * 3;
    if (size > MAX_BYTES) return; // sendBeacon refuses more than 64 KB in flight
    if (queue.length + 1 > MAX_EVENTS || bytes + size > MAX_BYTES) flush();
    queue.push(json); bytes += size + 1;
    if (!timer) timer = setTimeout(flush, interval);
  }
  // Outbox: events not yet confirmed by a 2xx, in localStorage (same event ids, so a
  // resend is stored once) up to MAX_EVENTS / MAX_BYTES, oldest dropped first; a reload
  // or the next page of the site sends what is left. Retries on 429, 503 and network
  // failures back off exponentially (1 s doubling to 60 s), never sooner than Retry-After.
  var BOX = "eventpipe.outbox", mem = [], sending = false, retry = 0, backoff = 0;
  function load() {
    if (mode === "anon") return mem;
    try { var v = JSON.parse(localStorage.getItem(BOX) || "[]"); return v.length >= 0 ? v : []; }
    catch (x) { return mem; }
  }
  function save(box) {
    var size = 0, i = box.length;
    while (i > 0 && box.length - i < MAX_EVENTS && size + box[i - 1].length < MAX_BYTES) size += box[--i].length + 1;
    box = box.slice(i); mem = box;
    if (mode === "anon") return box;
    try { if (box.length) localStorage.setItem(BOX, JSON.stringify(box)); else localStorage.removeItem(BOX); }
    catch (x) { /* memory only */ }
    return box;
  }
  function body(box) {
    return '{"events":[' + box.join(",") + '],"sent_at":"' + new Date().toISOString() + '"}';
  }
  function flush() {
    clearTimeout(timer); timer = 0;
    if (queue.length) { save(load().concat(queue)); queue = []; bytes = 0; }
    send();
  }
  function done(sent) {
    var gone = {};
    sent.forEach(function (e) { gone[e] = 1; });
    save(load().filter(function (e) { return !gone[e]; }));
  }
  function again(wait) {
    backoff = Math.min(60000, backoff ? backoff * 2 : 1000);
    clearTimeout(retry);
    retry = setTimeout(guard(function () { retry = 0; send(); }), Math.max(backoff, wait || 0));
  }
  function target() { return mode === "anon" ? url + "&anonymous=1" : url; }
  function send() {
    if (mode !== "on" && mode !== "anon") return;
    var box = load();
    if (!box.length || sending || retry) return;
    if (!w.fetch) { if (n.sendBeacon) n.sendBeacon(target(), new Blob([body(box)], { type: "text/plain" })); return; }
    sending = true;
    fetch(target(), { method: "POST", body: body(box), keepalive: true, credentials: "omit",
      headers: { "Content-Type": "text/plain" } }).then(function (r) {
      sending = false;
      if (r.status === 429 || r.status >= 500) return again(1000 * (+r.headers.get("Retry-After") || 0));
      backoff = 0; done(box); // 2xx, or a 4xx that no retry can cure
      if (load().length) send();
    }, function () { sending = false; again(0); });
  }
  // Leaving: sendBeacon can only say "queued", so the outbox is kept; if it arrived,
  // the next page's resend is deduplicated by event id.
  function leaveFlush() {
    if (mode !== "on" && mode !== "anon") return;
    if (queue.length) { save(load().concat(queue)); queue = []; bytes = 0; }
    var box = load();
    if (!box.length) return;
    try { if (n.sendBeacon && n.sendBeacon(target(), new Blob([body(box)], { type: "text/plain" }))) return; }
    catch (x) { /* fall back to fetch */ }
    sending = false; send();
  }

  // Rage clicks (>= 3 on one element within 600 ms) and hesitation (> 1.5 s hover).
  var burst = null, hover = null;
  function rage(b) {
    if (b && b.n >= 3 && !b.sent) {
      b.sent = true;
      track("rage_click", Object.assign(describe(b.el), { coordinates: b.xy, timestamp: b.at,
        event_data: { clicks: b.n, window_ms: 600 } }));
    }
  }
  var INTERACTIVE = "a,button,input,select,textarea,[role=button]";
  d.addEventListener("click", guard(function (e) {
    var el = elementOf(e.target);
    if (!el || !el.tagName) return;
    var now = Date.now(), xy = { x: Math.round(e.pageX), y: Math.round(e.pageY) };
    track("click", Object.assign(describe(el), { coordinates: xy }));
    var target = el.closest(INTERACTIVE);
    if (target && hover && hover.el === target && now - hover.t > 1500) {
      track("hesitation", Object.assign(describe(target), { coordinates: xy,
        event_data: { hesitation_ms: now - hover.t } }));
    }
    hover = null;
    if (burst && burst.el === el && now - burst.t <= 600 && !burst.sent) {
      burst.n += 1; burst.xy = xy; burst.at = new Date(now).toISOString();
      if (burst.n === 3) setTimeout(guard(rage.bind(null, burst)), burst.t + 600 - now);
    } else {
      rage(burst);
      burst = { el: el, t: now, n: 1, xy: xy, sent: false };
    }
  }), true);
  d.addEventListener("mouseover", guard(function (e) {
    var el = elementOf(e.target), target = el && el.closest && el.closest(INTERACTIVE);
    if (target && (!hover || hover.el !== target)) hover = { el: target, t: Date.now() };
    else if (!target) hover = null;
  }), true);

  // Scroll depth: 25/50/75/100 % thresholds as reached, the maximum when the page is left.
  var maxPct = 0, sentPct = 0, THRESHOLDS = [25, 50, 75, 100];
  w.addEventListener("scroll", guard(function () {
    var h = d.documentElement.scrollHeight;
    var pct = h > 0 ? Math.min(100, Math.round(((w.scrollY + w.innerHeight) / h) * 100)) : 100;
    if (pct <= maxPct) return;
    maxPct = pct;
    THRESHOLDS.forEach(function (t) {
      if (pct >= t && sentPct < t) {
        sentPct = t;
        track("scroll_depth", { event_data: { percentage: t } });
      }
    });
  }), { passive: true });

  // Forms: started on first input, submitted, or abandoned when the page goes away.
  var started = [];
  function formOf(el) { return el && (el.form || (el.closest && el.closest("form"))); }
  function formFields(form, data) {
    return Object.assign(describe(form), { event_data: data || {} });
  }
  d.addEventListener("input", guard(function (e) {
    var el = elementOf(e.target), form = formOf(el);
    if (!form || started.some(function (s) { return s.form === form; })) return;
    started.push({ form: form, done: false });
    track("form_start", formFields(form, { field: el.name || el.id || null }));
  }), true);
  d.addEventListener("submit", guard(function (e) {
    var form = e.target;
    started.forEach(function (s) { if (s.form === form) s.done = true; });
    track("form_submit", formFields(form));
  }), true);

  // JavaScript errors (at most 20 per page).
  function error(data) {
    if (errors++ < 20) track("error", { event_data: data });
  }
  w.addEventListener("error", guard(function (e) {
    error({ message: String(e.message || "").slice(0, 1000), source: e.filename || null,
      line: e.lineno || null, column: e.colno || null,
      stack: e.error && e.error.stack ? String(e.error.stack).slice(0, 2000) : null });
  }));
  w.addEventListener("unhandledrejection", guard(function (e) {
    var r = e.reason;
    error({ message: String((r && r.message) || r).slice(0, 1000), source: "unhandledrejection",
      stack: r && r.stack ? String(r.stack).slice(0, 2000) : null });
  }));

  // Leaving: rage burst, abandoned forms, final scroll depth, then one last batch.
  function leave(pagehide) {
    rage(burst);
    if (pagehide) {
      started.forEach(function (s) {
        if (!s.done) { s.done = true; track("form_abandon", formFields(s.form)); }
      });
    }
    if (maxPct > sentPct) {
      sentPct = maxPct;
      track("scroll_depth", { event_data: { percentage: maxPct, final: true } });
    }
    clearTimeout(timer); timer = 0;
    leaveFlush();
  }
  w.addEventListener("pagehide", guard(function () { leave(true); }));
  d.addEventListener("visibilitychange", guard(function () {
    if (d.visibilityState === "hidden") leave(false);
  }));

  function pageView(extra) {
    var s = w.screen || {};
    // facts: left out by track() when anonymous
    track("page_view", { metadata: { title: d.title || null }, event_data: extra || {},
      facts: { referrer: d.referrer || null, language: n.language || null,
        screen_resolution: s.width ? s.width + "x" + s.height : null } });
  }
  w.addEventListener("pageshow", guard(function (e) {
    if (e.persisted) pageView({ restored: true }); // back from the bfcache
  }));

  api.track = guard(function (type, data) {
    if (TYPES.split(" ").indexOf(type) < 0) return console.warn("eventpipe: unknown type", type);
    track(type, { event_data: data && typeof data === "object" ? data : {} });
  });
  api.flush = guard(flush);
  api.sessionId = function () {
    if (mode !== "on" && mode !== "anon") return null; // no storage touched before consent
    try { return sid(); } catch (x) { return null; }
  };

  // Consent: the shop's configuration and the visitor's answer decide the mode.
  function forget() {
    queue = []; bytes = 0; mem = []; memSid = null; clearTimeout(timer); timer = 0;
    try { localStorage.removeItem(BOX); sessionStorage.removeItem("eventpipe.sid"); } catch (x) { /* none */ }
  }
  function decide() {
    var next = given ? (given.analytics ? (given.anonymous ? "anon" : "on") : "off")
      : required === false ? "on" : "wait";
    if (next === mode) return;
    var was = mode;
    mode = next;
    if (mode === "off") { held = []; forget(); return; }
    if (was === "on") forget(); // now anonymous
    if (mode === "wait") return;
    var waiting = held;
    held = [];
    waiting.forEach(function (t) { track(t[0], t[1]); });
    send(); // and what an earlier page left in the outbox
  }
  api.consent = guard(function (c) {
    given = { analytics: !!(c && c.analytics), anonymous: !!(c && c.anonymous) };
    decide();
  });
  function configure(consentRequired) {
    if (required !== null) return;
    required = consentRequired;
    guard(decide)();
  }
  // Asked of the collector that served this script; until it answers, events wait in
  // memory (asked again with backoff on 429, 5xx and network errors); a 4xx or no fetch:
  // consent required, the privacy-safe choice.
  var home = (tag.src || base).replace(/\/v1\/beacon\.js([?#].*)?$/, "").replace(/\/$/, ""), pause = 0;
  function ask() {
    fetch(home + "/v1/beacon/config?k=" + encodeURIComponent(opt.writeKey), { credentials: "omit" })
      .then(function (r) {
        if (r.ok) return r.json().then(function (c) { configure(c.consent_required !== false); });
        if (r.status === 429 || r.status >= 500) throw r.status;
        configure(true);
      }).then(null, function () {
        pause = Math.min(60000, pause ? pause * 2 : 1000);
        setTimeout(guard(ask), pause);
      });
  }
  guard(pageView)();
  if (w.fetch) guard(ask)(); else configure(true);
})();
