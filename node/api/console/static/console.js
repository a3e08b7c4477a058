// imnode's web console: plain browser JavaScript, no build step, nothing loaded from elsewhere.
// It talks only to the node that served it (the /admin/cluster fan-out reaches the others), and the
// playground's clients talk the WuKongIM binary protocol to the nodes' WebSocket ports.
'use strict';

const $ = (sel, root = document) => root.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') node.className = v;
    else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
    else if (k === 'dataset') Object.assign(node.dataset, v);
    else if (k === 'style') node.style.cssText = v; // CSSOM: the CSP refuses style attributes, not this
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child ?? ''));
  return node;
};
const TOKEN_KEY = 'imnode.console.token';
const WINDOW_S = 180; // the charts show the last three minutes
const GAP_S = 3; // samples come each second: a longer silence (a node that did not answer) is a gap
const COLORS = ['#2563eb', '#dc2626', '#16a34a', '#9333ea', '#ea580c', '#0891b2'];

const state = {
  token: sessionStorage.getItem(TOKEN_KEY) || '',
  open: false,          // no manager token configured on the node
  tab: 'overview',
  series: {},           // node -> [samples]
  lastT: 0,
  nodes: [],            // node ids, in config order
  status: {},           // node -> status or null
  leader: null,
  timer: null,
};

// -- HTTP ------------------------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, msg) { super(msg); this.status = status; }
}

async function api(method, path, body) {
  const headers = { 'content-type': 'application/json' };
  if (state.token) headers.token = state.token;
  let response;
  try {
    response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (exc) {
    throw new ApiError(0, `the node that served this page does not answer (${exc.message})`);
  }
  let answer = null;
  try { answer = await response.json(); } catch (_) { /* not JSON */ }
  if (response.status === 401) {
    showLogin(state.token ? 'Wrong token: the node refused it (HTTP 401). Enter the cluster\'s manager_token.' : '');
    throw new ApiError(401, 'not logged in');
  }
  if (!response.ok) throw new ApiError(response.status, (answer && answer.msg) || `HTTP ${response.status}`);
  return answer;
}

const query = (params) => Object.entries(params).filter(([, v]) => v !== '' && v !== undefined && v !== null)
  .map(([k, v]) => `${encodeURIComponent(k)}=${encodeURIComponent(v)}`).join('&');

function say(id, text, kind = 'info') {
  const node = $(id);
  node.textContent = text;
  node.dataset.kind = kind;
}

// -- login -----------------------------------------------------------------------------------------------
function showLogin(message, kind = 'error') {
  stopTimer();
  $('#app').hidden = true;
  $('#tabs').hidden = true;
  $('#logout').hidden = true;
  $('#login').hidden = false;
  say('#login-message', message, message ? kind : 'info');
}

async function start() {
  let status;
  try {
    status = await api('GET', '/admin/status');
  } catch (exc) {
    if (exc.status !== 401) showLogin(`Cannot reach the node: ${exc.message}`);
    return;
  }
  state.open = !state.token;
  $('#login').hidden = true;
  $('#app').hidden = false;
  $('#tabs').hidden = false;
  $('#logout').hidden = state.open;
  $('#whoami').textContent = `served by ${status.id}`;
  const banner = $('#banner');
  if (state.open) {
    banner.hidden = false;
    banner.textContent = 'No manager token is configured on this node: the console and the HTTP API are open to ' +
      'anyone who can reach its HTTP port (127.0.0.1 by default). Set cluster.manager_token to require one.';
  } else {
    banner.hidden = true;
  }
  showTab(state.tab);
}

$('#login-form').addEventListener('submit', (event) => {
  event.preventDefault();
  state.token = $('#token').value.trim();
  if (!state.token) { say('#login-message', 'Enter the manager token.', 'error'); return; }
  sessionStorage.setItem(TOKEN_KEY, state.token);
  say('#login-message', 'Checking…');
  start();
});

$('#logout').addEventListener('click', () => {
  sessionStorage.removeItem(TOKEN_KEY);
  state.token = '';
  $('#token').value = ''; // gone from the tab: the next person at this screen must type it
  showLogin('Logged out.', 'info');
});

// -- tabs ------------------------------------------------------------------------------------------------
function stopTimer() { if (state.timer) { clearInterval(state.timer); state.timer = null; } }

function showTab(name) {
  state.tab = name;
  for (const button of document.querySelectorAll('#tabs button')) button.classList.toggle('active', button.dataset.tab === name);
  for (const section of document.querySelectorAll('section.tab')) section.hidden = section.id !== name;
  stopTimer();
  // The overview keeps sampling in the background so the charts have no hole when one comes back to it.
  state.timer = setInterval(() => { refreshOverview(); if (state.tab === 'connections') refreshConnections(); }, 1000);
  refreshOverview();
  if (name === 'connections') refreshConnections();
  if (name === 'handlers') refreshHandlers();
  if (name === 'deadletters') refreshDeadLetters();
  if (name === 'playground') setUpPlayground();
}
for (const button of document.querySelectorAll('#tabs button')) button.addEventListener('click', () => showTab(button.dataset.tab));

// -- overview --------------------------------------------------------------------------------------------
let overviewRun = null;
function refreshOverview() {
  // One refresh at a time (a slow member must not pile requests up); a caller during one waits for it.
  if (!overviewRun) overviewRun = fetchOverview().finally(() => { overviewRun = null; });
  return overviewRun;
}
async function fetchOverview() {
  try {
    const answer = await api('GET', `/admin/cluster?${query({ path: '/admin/stats', since: state.lastT })}`);
    state.nodes = answer.configured || answer.nodes.map((n) => n.id); // a node of an older version: members only
    let newest = state.lastT;
    for (const node of answer.nodes) {
      state.status[node.id] = node.ok ? node.body.status : null;
      if (!node.ok) { state.status[node.id + ':error'] = node.error; continue; }
      const rows = state.series[node.id] || (state.series[node.id] = []);
      const seen = rows.length ? rows[rows.length - 1].t : 0;
      for (const row of node.body.samples) if (row.t > seen) rows.push(row);
      const cut = Date.now() / 1000 - WINDOW_S - 5;
      while (rows.length && rows[0].t < cut) rows.shift();
      if (rows.length) newest = Math.max(newest, rows[rows.length - 1].t);
    }
    // Each node's clock stamps its own samples: ask a little before the newest one seen.
    state.lastT = Math.max(0, Math.floor(newest - 10));
    renderMembers();
    renderCharts();
  } catch (exc) {
    if (exc.status !== 401) say('#overview-message', `Overview not refreshed: ${exc.message}`, 'error');
  }
}

function members() {
  const leader = Object.values(state.status).find((s) => s && s.role === 'leader');
  state.leader = leader ? leader.id : null;
  const source = leader || Object.values(state.status).find((s) => s && s.members);
  return source ? source.members : state.nodes;
}

function renderMembers() {
  const memberIds = members();
  const body = $('#members tbody');
  body.replaceChildren();
  const down = [];
  for (const id of state.nodes) {
    const s = state.status[id];
    if (!s) {
      const member = memberIds.includes(id);
      const role = member ? 'down' : 'not a member';
      if (member) down.push(id);
      body.append(el('tr', { class: member ? 'down' : 'not-member', dataset: { node: id, role } }, el('td', {}, id), el('td', {}, role),
        el('td', { colspan: 9, class: 'why' }, member ? state.status[id + ':error'] || '' : 'configured, not in the cluster')));
      continue;
    }
    const q = s.pools || {};
    const depth = (p) => (q[p] ? q[p].queue_depth : '');
    const rows = state.series[id] || [];
    const cpu = rows.length ? `${rows[rows.length - 1].cpu_percent}% (${s.process.cpu_s} s)` : `${s.process.cpu_s} s`;
    body.append(el('tr', { class: s.role === 'leader' ? 'leader' : '', dataset: { node: id, role: s.role } },
      el('td', {}, id, s.role === 'leader' ? el('span', { class: 'star', title: 'leader' }, ' ★') : ''),
      el('td', {}, s.role), el('td', {}, s.term), el('td', {}, s.commit_index), el('td', {}, s.applied_index),
      el('td', {}, s.lag), el('td', {}, s.connections), el('td', {}, `${depth('user')} / ${depth('channel')} / ${depth('pusher')}`),
      el('td', {}, s.dead_letters), el('td', {}, `${s.process.peak_rss_mb} MB`), el('td', {}, cpu)));
  }
  const leaderText = state.leader ? `leader ${state.leader}` : 'no leader: nothing can be committed';
  if (down.length) {
    say('#overview-message', `${down.join(', ')} ${down.length > 1 ? 'are' : 'is'} down (no answer); ${leaderText}. ` +
      'The other members keep serving.', 'error');
  } else {
    const count = `${memberIds.length} member${memberIds.length === 1 ? '' : 's'}`;
    say('#overview-message', `${count}, ${leaderText}.`, state.leader ? 'info' : 'error');
  }
}

function colorOf(id) { return COLORS[Math.max(0, state.nodes.indexOf(id)) % COLORS.length]; }

function drawChart(svg, lines, total = true) {
  // lines: [{node, key, dashed}]; each a polyline of (t, value) over the last WINDOW_S seconds.
  const width = svg.clientWidth || 420;
  const height = svg.clientHeight || 150;
  const pad = { left: 44, right: 8, top: 8, bottom: 18 };
  const now = Date.now() / 1000;
  let max = 0;
  let points = 0;
  let last = 0;
  const prepared = lines.map((line) => {
    // Segments of consecutive samples: a sample without a value (no traced send that second) or a
    // missing sample ends one. Joining across them would draw a trend nobody measured.
    const segments = [];
    let current = null;
    let previousT = -Infinity;
    for (const r of state.series[line.node] || []) {
      if (r.t <= now - WINDOW_S) continue;
      if (r[line.key] === null || r[line.key] === undefined) { current = null; previousT = r.t; continue; }
      if (!current || r.t - previousT > GAP_S) segments.push(current = []);
      current.push(r);
      previousT = r.t;
    }
    const rows = segments.flat();
    for (const r of rows) max = Math.max(max, r[line.key]);
    points += rows.length;
    if (rows.length && !line.dashed) {
      const value = rows[rows.length - 1][line.key];
      last = total ? last + value : Math.max(last, value); // rates add up over nodes; times and lags do not
    }
    return { ...line, segments };
  });
  const top = max > 0 ? niceCeil(max) : 1;
  const x = (t) => pad.left + ((t - (now - WINDOW_S)) / WINDOW_S) * (width - pad.left - pad.right);
  const y = (v) => height - pad.bottom - (v / top) * (height - pad.top - pad.bottom);
  const ns = 'http://www.w3.org/2000/svg';
  const make = (tag, attrs, text) => {
    const node = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  };
  svg.replaceChildren();
  svg.setAttribute('viewBox', `0 0 ${width} ${height}`);
  for (const frac of [0, 0.5, 1]) {
    const v = top * frac;
    svg.append(make('line', { x1: pad.left, x2: width - pad.right, y1: y(v), y2: y(v), class: 'grid' }));
    svg.append(make('text', { x: pad.left - 4, y: y(v) + 4, 'text-anchor': 'end', class: 'axis' }, fmt(v)));
  }
  svg.append(make('text', { x: pad.left, y: height - 4, class: 'axis' }, `−${WINDOW_S / 60} min`));
  svg.append(make('text', { x: width - pad.right, y: height - 4, 'text-anchor': 'end', class: 'axis' }, 'now'));
  for (const line of prepared) {
    if (!line.segments.length) continue;
    const series = make('g', { class: 'series', 'data-node': line.node, 'data-key': line.key });
    for (const segment of line.segments) {
      if (segment.length === 1) { // one sample alone: a dot, as a line needs two
        const r = segment[0];
        series.append(make('circle', { cx: x(r.t).toFixed(1), cy: y(r[line.key]).toFixed(1), r: 1.8, fill: colorOf(line.node) }));
        continue;
      }
      const d = segment.map((r) => `${x(r.t).toFixed(1)},${y(r[line.key]).toFixed(1)}`).join(' ');
      series.append(make('polyline', { points: d, fill: 'none', stroke: colorOf(line.node), 'stroke-width': 1.8,
        'stroke-dasharray': line.dashed ? '4 3' : 'none', 'data-node': line.node }));
    }
    svg.append(series);
  }
  if (!points) {
    svg.append(make('text', { x: (pad.left + width - pad.right) / 2, y: (pad.top + height - pad.bottom) / 2,
      'text-anchor': 'middle', class: 'empty' }, 'no samples yet'));
  }
  // For tests and for the curious: what the chart shows right now.
  svg.dataset.points = points;
  svg.dataset.max = max;
  svg.dataset.last = last;
  const now_ = svg.parentElement.querySelector('.now');
  if (now_) now_.textContent = points ? `— now ${fmt(Math.round(last * 10) / 10)} ${total ? 'in all' : 'at most'}` : '';
}

function niceCeil(v) {
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}
function fmt(v) { return v >= 1000 ? `${(v / 1000).toFixed(1)}k` : (Number.isInteger(v) ? String(v) : v.toFixed(1)); }

function renderCharts() {
  const ids = state.nodes.filter((id) => state.series[id]);
  drawChart($('#chart-sends'), ids.map((node) => ({ node, key: 'sends_per_s' })));
  drawChart($('#chart-deliveries'), ids.map((node) => ({ node, key: 'deliveries_per_s' })));
  drawChart($('#chart-latency'), ids.flatMap((node) => [{ node, key: 'ack_p99_ms' }, { node, key: 'ack_p50_ms', dashed: true }]), false);
  drawChart($('#chart-lag'), ids.map((node) => ({ node, key: 'lag' })), false);
  $('#legend').replaceChildren(...state.nodes.map((id) => el('span', { class: 'key', style: `color:${colorOf(id)}` }, `■ ${id} `)));
}

// -- connections -----------------------------------------------------------------------------------------
let connBusy = false;
async function refreshConnections() {
  if (connBusy) return;
  connBusy = true;
  try {
    if (!state.nodes.length) await refreshOverview(); // who is a member: configured non-members are not asked about
    const answer = await api('GET', `/admin/cluster?${query({ path: '/connz', limit: 1000, uid: $('#conn-uid').value.trim() })}`);
    const body = $('#conn-table tbody');
    body.replaceChildren();
    const problems = [];
    let total = 0;
    const memberIds = members();
    const outside = [];
    for (const node of answer.nodes) {
      if (!memberIds.includes(node.id)) { outside.push(node.id); if (!node.ok) continue; } // not a member: no error
      if (!node.ok) { problems.push(`${node.id}: ${node.error}`); continue; }
      total += node.body.total;
      for (const c of node.body.connections) {
        body.append(el('tr', { dataset: { node: node.id, uid: c.uid, conn: c.id } },
          el('td', {}, node.id), el('td', {}, c.id), el('td', {}, c.uid), el('td', {}, c.device), el('td', {}, c.device_id),
          el('td', {}, c.protocol === 'jsonrpc' ? 'JSON-RPC' : `binary v${c.version}`), el('td', {}, c.proxy_type_format), el('td', {}, `${c.ip}:${c.port}`),
          el('td', {}, `${Math.round(c.uptime)} s ago`), el('td', {}, `${c.in_packets} / ${c.out_packets}`),
          el('td', {}, el('button', { class: 'kick', onclick: () => kick(node.id, c.id, c.uid) }, 'Kick'))));
      }
    }
    const asked = answer.nodes.length - outside.length;
    const others = outside.length ? ` (${outside.join(', ')}: configured, not a member)` : '';
    if (problems.length) say('#conn-message', `${total} connections; not answering: ${problems.join('; ')}${others}`, 'error');
    else if (!$('#conn-message').dataset.sticky) say('#conn-message', `${total} connections on ${asked} member${asked === 1 ? '' : 's'}.${others}`);
  } catch (exc) {
    if (exc.status !== 401) say('#conn-message', `Connections not refreshed: ${exc.message}`, 'error');
  } finally {
    connBusy = false;
  }
}
$('#conn-form').addEventListener('submit', (event) => { event.preventDefault(); delete $('#conn-message').dataset.sticky; refreshConnections(); });

async function kick(node, id, uid) {
  try {
    await api('POST', '/admin/kick', { node, id });
    say('#conn-message', `Kicked ${uid} (connection ${id} on ${node}).`);
  } catch (exc) {
    say('#conn-message', `Kick failed: ${exc.message}`, 'error');
  }
  $('#conn-message').dataset.sticky = '1';
  refreshConnections();
}

// -- channels and users ----------------------------------------------------------------------------------
const PAGE = 20;
const view = { channel: null, low: 0, high: 0 };

function b64ToBytes(text) { return Uint8Array.from(atob(text), (c) => c.charCodeAt(0)); }
function showPayload(b64) {
  const bytes = b64ToBytes(b64);
  let text;
  try { text = new TextDecoder('utf-8', { fatal: true }).decode(bytes); } catch (_) { return el('code', { class: 'binary' }, `base64 ${b64}`); }
  try { return el('pre', { class: 'json' }, JSON.stringify(JSON.parse(text), null, 2)); } catch (_) { return el('span', {}, text); }
}

$('#channel-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  const params = { channel_id: $('#channel-id').value.trim(), channel_type: $('#channel-type').value, login_uid: $('#channel-login').value.trim() };
  $('#channel-result').hidden = true;
  try {
    const info = await api('GET', `/admin/channel?${query(params)}`);
    view.channel = { ...params, channel_id: info.channel_id, last: info.last_message_seq };
    const table = $('#channel-info');
    table.replaceChildren(el('tr', {}, el('th', {}, 'channel'), el('td', {}, `${info.channel_id} (type ${info.channel_type})`)),
      ...Object.entries(info.info).map(([k, v]) => el('tr', {}, el('th', {}, k), el('td', {}, v))));
    for (const name of ['subscribers', 'blacklist', 'whitelist']) {
      const list = $(`#channel-${name}`);
      list.replaceChildren(...info[name].map((uid) => el('li', {}, uid)));
      if (!info[name].length) list.append(el('li', { class: 'none' }, 'none'));
      if (info.truncated[name]) list.append(el('li', { class: 'none' }, '… (first 1000)'));
    }
    $('#channel-result').hidden = false;
    say('#channel-message', `${info.channel_id}: ${info.last_message_seq} messages.`);
    $('#channel-messages tbody').replaceChildren();
    $('#msg-range').textContent = '';
    await loadMessages(0, 0, 0, true);
  } catch (exc) {
    if (exc.status === 404) say('#channel-message', `Unknown channel: ${exc.message}.`, 'error');
    else if (exc.status !== 401) say('#channel-message', `Lookup failed: ${exc.message}`, 'error');
  }
});

async function loadMessages(start, end, pullMode, first = false) {
  const c = view.channel;
  const answer = await api('POST', '/channel/messagesync', {
    login_uid: c.login_uid || 'console', channel_id: c.channel_id, channel_type: Number(c.channel_type),
    start_message_seq: start, end_message_seq: end, limit: PAGE, pull_mode: pullMode,
  });
  const rows = answer.messages.sort((a, b) => b.message_seq - a.message_seq);
  if (!rows.length) {
    if (!first) say('#channel-message', 'No more messages that way.');
    else $('#msg-range').textContent = 'no messages yet';
    return;
  }
  view.high = rows[0].message_seq;
  view.low = rows[rows.length - 1].message_seq;
  $('#msg-range').textContent = `seq ${view.low}–${view.high}`;
  $('#channel-messages tbody').replaceChildren(...rows.map((m) => el('tr', { dataset: { seq: m.message_seq } },
    el('td', {}, m.message_seq), el('td', {}, m.from_uid), el('td', {}, new Date(m.timestamp * 1000).toLocaleString()),
    el('td', {}, m.client_msg_no), el('td', {}, showPayload(m.payload)))));
}
$('#msg-older').addEventListener('click', () => view.low > 1 && loadMessages(view.low - 1, 0, 0).catch((e) => say('#channel-message', e.message, 'error')));
$('#msg-newer').addEventListener('click', () => loadMessages(view.high + 1, 0, 1).catch((e) => say('#channel-message', e.message, 'error')));

$('#user-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  const uid = $('#user-uid').value.trim();
  $('#user-result').hidden = true;
  try {
    const user = await api('GET', `/admin/user?${query({ uid })}`);
    const conversations = await api('POST', '/conversation/sync', { uid, msg_count: 1 });
    $('#user-devices').replaceChildren(el('tr', {}, el('th', {}, 'node'), el('th', {}, 'connection'), el('th', {}, 'device flag'), el('th', {}, 'device level')),
      ...user.devices.map((d) => el('tr', {}, el('td', {}, d.node), el('td', {}, d.conn), el('td', {}, d.device_flag), el('td', {}, d.device_level))));
    $('#user-conversations').replaceChildren(el('tr', {}, el('th', {}, 'channel'), el('th', {}, 'type'), el('th', {}, 'last seq'), el('th', {}, 'unread'), el('th', {}, 'last message')),
      ...conversations.map((c) => el('tr', { dataset: { channel: c.channel_id } }, el('td', {}, c.channel_id), el('td', {}, c.channel_type), el('td', {}, c.last_msg_seq),
        el('td', { class: 'unread' }, c.unread), el('td', {}, c.recents.length ? showPayload(c.recents[0].payload) : ''))));
    $('#user-result').hidden = false;
    say('#user-message', `${uid}: ${user.online ? `online on ${[...new Set(user.devices.map((d) => d.node))].join(', ')}` : 'offline'}, ` +
      `${conversations.length} conversations.`);
  } catch (exc) {
    if (exc.status !== 401) say('#user-message', `Lookup failed: ${exc.message}`, 'error');
  }
});

// -- handlers --------------------------------------------------------------------------------------------
async function refreshHandlers() {
  try {
    const answer = await api('GET', '/admin/cluster?path=/admin/handlers');
    const rows = new Map();
    const problems = [];
    const plugins = new Set();
    const ids = [];
    for (const node of answer.nodes) {
      if (!node.ok) { if (!node.error.startsWith('down') || members().includes(node.id)) problems.push(`${node.id}: ${node.error}`); continue; }
      ids.push(node.id);
      for (const p of node.body.plugins) plugins.add(p);
      for (const [pool, events] of Object.entries(node.body.pools)) {
        for (const [event, chain] of Object.entries(events)) {
          chain.forEach((h, i) => {
            const key = `${pool}/${event}/${h.name}`;
            const row = rows.get(key) || { pool, event, name: h.name, kind: h.kind, order: i, calls: 0, rejects: 0, errors: 0, p99: 0, timed: false, enabled: {} };
            row.calls += h.calls; row.rejects += h.rejects; row.errors += h.errors; row.p99 = Math.max(row.p99, h.p99_ms);
            row.timed = row.timed || h.timed !== false; // a node of an older version says nothing: timed
            row.enabled[node.id] = h.enabled;
            rows.set(key, row);
          });
        }
      }
    }
    const body = $('#handler-table tbody');
    body.replaceChildren(...[...rows.values()].map((h) => {
      const on = Object.values(h.enabled).every(Boolean);
      const states = el('td', {}, ...ids.map((id) => el('span', { class: `state ${h.enabled[id] ? 'on' : 'off'}`, dataset: { node: id } },
        `${id} ${h.enabled[id] ? 'enabled' : 'disabled'} `)));
      const action = plugins.has(h.name)
        ? el('button', { class: 'toggle', onclick: () => setHandler(h.name, !on) }, on ? 'Disable' : 'Enable')
        : el('span', { class: 'none' }, 'built-in');
      const p99 = h.timed ? el('td', { class: 'p99' }, h.p99)
        : el('td', { class: 'p99 none', title: 'built-in steps are counted, not timed: timing each call cost as much as the step' }, 'not timed');
      const name = h.pool === 'channel' && h.event === 'distribute' && h.name === 'distribute'
        ? el('td', {}, h.name, el('div', { class: 'note' }, 'runs only while a plugin is on this chain (then once per committed message)'))
        : el('td', {}, h.name);
      return el('tr', { dataset: { handler: h.name, pool: h.pool, event: h.event } }, el('td', {}, h.pool), el('td', {}, h.event), name,
        el('td', {}, h.kind), states, el('td', {}, h.calls), el('td', {}, h.rejects), el('td', {}, h.errors), p99, el('td', {}, action));
    }));
    if (problems.length) say('#handlers-message', `Not answering: ${problems.join('; ')}`, 'error');
  } catch (exc) {
    if (exc.status !== 401) say('#handlers-message', `Handlers not refreshed: ${exc.message}`, 'error');
  }
}

async function setHandler(name, enabled) {
  try {
    await api('POST', '/admin/handlers/state', { name, enabled: enabled ? 1 : 0 });
    say('#handlers-message', `${name} ${enabled ? 'enabled' : 'disabled'} through Raft; every node applies it.`);
  } catch (exc) {
    say('#handlers-message', `Could not switch ${name}: ${exc.message}`, 'error');
  }
  // Each member applies the change when it commits there: show it arriving.
  for (let i = 0; i < 10; i++) {
    await refreshHandlers();
    const spans = document.querySelectorAll(`#handler-table tr[data-handler="${CSS.escape(name)}"] .state`);
    if ([...spans].every((s) => s.classList.contains(enabled ? 'on' : 'off'))) break;
    await new Promise((r) => setTimeout(r, 300));
  }
}

// -- dead letters ----------------------------------------------------------------------------------------
async function refreshDeadLetters() {
  try {
    const answer = await api('GET', '/admin/cluster?path=/admin/deadletters');
    const first = answer.nodes.find((n) => n.ok);
    const letters = first ? first.body.deadletters : [];
    $('#dl-table tbody').replaceChildren(...letters.map((d) => el('tr', {}, el('td', {}, d.stream), el('td', {}, d.event), el('td', {}, d.seq),
      el('td', {}, d.attempts), el('td', {}, d.error))));
    const dropped = first ? Object.values(first.body.dropped || {}).reduce((a, b) => a + b, 0) : 0;
    $('#dl-dropped').textContent = first ? `${dropped} dropped (oldest first; at most ${first.body.deadletters_max} kept per stream).` : '';
    if (!$('#dl-message').dataset.sticky) say('#dl-message', letters.length ? `${letters.length} dead letters.` : 'No dead letters.');
    delete $('#dl-message').dataset.sticky;
    $('#dl-pools').replaceChildren(el('tr', {}, el('th', {}, 'node'), el('th', {}, 'user'), el('th', {}, 'channel'), el('th', {}, 'pusher')),
      ...state.nodes.map((id) => {
        const s = state.status[id];
        const cell = (p) => el('td', {}, s && s.pools[p] ? s.pools[p].dead_letters : '—');
        return el('tr', {}, el('td', {}, id), cell('user'), cell('channel'), cell('pusher'));
      }));
  } catch (exc) {
    if (exc.status !== 401) say('#dl-message', `Dead letters not refreshed: ${exc.message}`, 'error');
  }
}
$('#dl-refresh').addEventListener('click', refreshDeadLetters);
$('#replay').addEventListener('click', async () => {
  say('#dl-message', 'Replaying on the leader…');
  try {
    const r = await api('POST', '/admin/cluster/replay', {});
    say('#dl-message', `Replayed on ${r.leader}: ${r.replayed} delivered, ${r.failed} failed${r.error ? ` (${r.error})` : ''}.`, r.failed ? 'error' : 'info');
  } catch (exc) {
    say('#dl-message', `Replay failed: ${exc.message}`, 'error');
  }
  $('#dl-message').dataset.sticky = '1';
  refreshDeadLetters();
});

// -- the WuKongIM protocol, for the playground -------------------------------------------------------
// Frames as node/wire/protocol.py lays them out at protocol version 5 (the version that gets a streamed
// message's EVENT packets); payloads encrypted as the SDKs do (node/wire/crypto.py): X25519, AES-128-CBC
// with an MD5-derived key, msg_key = MD5 of a signed string.
const PROTO_VERSION = 5;
const enc = new TextEncoder();
const dec = new TextDecoder();

class Writer {
  constructor() { this.parts = []; }
  u8(v) { this.parts.push(Uint8Array.of(v)); return this; }
  u16(v) { const b = new Uint8Array(2); new DataView(b.buffer).setUint16(0, v); this.parts.push(b); return this; }
  u32(v) { const b = new Uint8Array(4); new DataView(b.buffer).setUint32(0, v); this.parts.push(b); return this; }
  i64(v) { const b = new Uint8Array(8); new DataView(b.buffer).setBigInt64(0, BigInt(v)); this.parts.push(b); return this; }
  str(s) { const b = enc.encode(s); this.u16(b.length); this.parts.push(b); return this; }
  bytes(b) { this.parts.push(b); return this; }
  frame(first) {
    let n = this.parts.reduce((a, p) => a + p.length, 0);
    const head = [first];
    do { let d = n & 0x7f; n >>>= 7; if (n) d |= 0x80; head.push(d); } while (n);
    const out = new Uint8Array(head.length + this.parts.reduce((a, p) => a + p.length, 0));
    out.set(head, 0);
    let off = head.length;
    for (const p of this.parts) { out.set(p, off); off += p.length; }
    return out;
  }
}

class Reader {
  constructor(bytes) { this.b = bytes; this.v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength); this.o = 0; }
  u8() { return this.v.getUint8(this.o++); }
  u16() { const x = this.v.getUint16(this.o); this.o += 2; return x; }
  u32() { const x = this.v.getUint32(this.o); this.o += 4; return x; }
  i32() { const x = this.v.getInt32(this.o); this.o += 4; return x; }
  i64() { const x = this.v.getBigInt64(this.o); this.o += 8; return x; }
  u64() { const x = this.v.getBigUint64(this.o); this.o += 8; return x; }
  str() { const n = this.u16(); const s = dec.decode(this.b.subarray(this.o, this.o + n)); this.o += n; return s; }
  rest() { return this.b.subarray(this.o); }
}

function decodeFrame(frame) {
  const first = frame[0];
  const type = first >> 4;
  const flags = first & 0x0f;
  if (type === 7 || type === 8) return { type };
  let o = 1; let n = 0; let shift = 0;
  for (;;) { const d = frame[o++]; n |= (d & 0x7f) << shift; shift += 7; if (!(d & 0x80)) break; }
  const r = new Reader(frame.subarray(o, o + n));
  if (type === 2) {
    const serverVersion = flags & 1 ? r.u8() : 0;
    const timeDiff = r.i64(); const reason = r.u8(); const serverKey = r.str(); const salt = r.str();
    const nodeId = serverVersion >= 4 ? Number(r.u64()) : 0;
    return { type, serverVersion, timeDiff, reason, serverKey, salt, nodeId };
  }
  if (type === 4) return { type, messageId: r.i64(), clientSeq: r.u32(), messageSeq: r.u32(), reason: r.u8() };
  if (type === 5) {
    const setting = r.u8(); const msgKey = r.str(); const fromUid = r.str(); const channelId = r.str();
    const channelType = r.u8(); r.u32(); const clientMsgNo = r.str(); // no stream fields at version 5
    const messageId = r.i64(); const messageSeq = r.u32(); const timestamp = r.i32();
    if (setting & 0x08) r.str(); // topic
    return { type, setting, msgKey, fromUid, channelId, channelType, clientMsgNo, messageId, messageSeq, timestamp, payload: r.rest() };
  }
  if (type === 9) return { type, reason: r.u8(), text: n > 1 ? r.str() : '' };
  if (type === 12) { // EVENT: a streamed message's delta, snapshot or end; its data is clear JSON
    const id = r.str(); const eventType = r.str(); const timestamp = r.i64();
    let data = {};
    try { data = JSON.parse(dec.decode(r.rest())); } catch (_) { /* not JSON: shown empty */ }
    return { type, id, eventType, timestamp, data };
  }
  return { type };
}

// MD5 (RFC 1321): the SDKs' key derivation and msg_key need it, and WebCrypto has no MD5.
const MD5_K = Array.from({ length: 64 }, (_, i) => Math.floor(Math.abs(Math.sin(i + 1)) * 2 ** 32) >>> 0);
const MD5_S = [7, 12, 17, 22, 5, 9, 14, 20, 4, 11, 16, 23, 6, 10, 15, 21];
function md5hex(bytes) {
  const n = bytes.length;
  const words = (((n + 8) >>> 6) + 1) * 16;
  const m = new Uint32Array(words);
  for (let i = 0; i < n; i++) m[i >> 2] |= bytes[i] << ((i % 4) * 8);
  m[n >> 2] |= 0x80 << ((n % 4) * 8);
  m[words - 2] = (n * 8) >>> 0;
  m[words - 1] = Math.floor(n / 0x20000000);
  let a0 = 0x67452301; let b0 = 0xefcdab89; let c0 = 0x98badcfe; let d0 = 0x10325476;
  for (let off = 0; off < words; off += 16) {
    let a = a0; let b = b0; let c = c0; let d = d0;
    for (let i = 0; i < 64; i++) {
      let f; let g;
      if (i < 16) { f = (b & c) | (~b & d); g = i; } else if (i < 32) { f = (d & b) | (~d & c); g = (5 * i + 1) % 16; } else if (i < 48) { f = b ^ c ^ d; g = (3 * i + 5) % 16; } else { f = c ^ (b | ~d); g = (7 * i) % 16; }
      const s = MD5_S[(i >> 4) * 4 + (i % 4)];
      f = (f + a + MD5_K[i] + m[off + g]) | 0;
      a = d; d = c; c = b;
      b = (b + ((f << s) | (f >>> (32 - s)))) | 0;
    }
    a0 = (a0 + a) | 0; b0 = (b0 + b) | 0; c0 = (c0 + c) | 0; d0 = (d0 + d) | 0;
  }
  let hex = '';
  for (const v of [a0, b0, c0, d0]) for (let i = 0; i < 4; i++) hex += ((v >>> (i * 8)) & 255).toString(16).padStart(2, '0');
  return hex;
}

const toB64 = (bytes) => btoa(String.fromCharCode(...bytes));
const ascii = (s) => Uint8Array.from(s, (c) => c.charCodeAt(0));
const concat = (a, b) => { const out = new Uint8Array(a.length + b.length); out.set(a); out.set(b, a.length); return out; };

class Cipher {
  static async create(privateKey, serverKeyB64, salt) {
    const serverKey = await crypto.subtle.importKey('raw', b64ToBytes(serverKeyB64), { name: 'X25519' }, false, []);
    const shared = new Uint8Array(await crypto.subtle.deriveBits({ name: 'X25519', public: serverKey }, privateKey, 256));
    const aesKey = ascii(md5hex(ascii(toB64(shared))).slice(0, 16));
    const key = await crypto.subtle.importKey('raw', aesKey, { name: 'AES-CBC' }, false, ['encrypt', 'decrypt']);
    return new Cipher(key, ascii(salt.slice(0, 16)));
  }
  constructor(key, iv) { this.key = key; this.iv = iv; }
  async encrypt(bytes) { // base64 text of AES-CBC-PKCS7, as ASCII bytes: the wire form of a payload
    return ascii(toB64(new Uint8Array(await crypto.subtle.encrypt({ name: 'AES-CBC', iv: this.iv }, this.key, bytes))));
  }
  async decrypt(wire) {
    return new Uint8Array(await crypto.subtle.decrypt({ name: 'AES-CBC', iv: this.iv }, this.key, b64ToBytes(dec.decode(wire))));
  }
  async msgKey(signBytes) { return md5hex(await this.encrypt(signBytes)); }
}

class ImClient {
  constructor(url, uid, events) { this.url = url; this.uid = uid; this.events = events; this.seq = 0; this.pending = new Map(); }
  async connect() {
    if (!window.isSecureContext || !crypto.subtle) {
      throw new Error('the playground needs WebCrypto: open the console over https or on 127.0.0.1/localhost');
    }
    const pair = await crypto.subtle.generateKey({ name: 'X25519' }, true, ['deriveBits']);
    const publicKey = toB64(new Uint8Array(await crypto.subtle.exportKey('raw', pair.publicKey)));
    this.ws = new WebSocket(this.url);
    this.ws.binaryType = 'arraybuffer';
    const opened = new Promise((resolve, reject) => {
      this.ws.onerror = () => reject(new Error(`cannot open ${this.url}`));
      this.ws.onclose = (e) => reject(new Error(`closed before CONNACK (${e.code})`));
      this.ws.onmessage = async (event) => {
        const p = decodeFrame(new Uint8Array(event.data));
        if (p.type !== 2) return;
        if (p.reason !== 1) { reject(new Error(`CONNACK reason ${p.reason}`)); return; }
        this.cipher = p.serverKey ? await Cipher.create(pair.privateKey, p.serverKey, p.salt) : null;
        this.nodeId = p.nodeId;
        resolve(p);
      };
    });
    this.ws.onopen = () => {
      const w = new Writer().u8(PROTO_VERSION).u8(1).str(`console-${Math.random().toString(36).slice(2, 10)}`)
        .str(this.uid).str('').i64(Date.now()).str(publicKey);
      this.ws.send(w.frame(0x10));
    };
    const connack = await opened;
    this.ws.onmessage = (event) => this.onFrame(new Uint8Array(event.data)).catch((e) => this.events.error(e));
    this.ws.onclose = () => this.events.closed(this.closeReason || 'connection closed');
    this.ws.onerror = null;
    this.ping = setInterval(() => this.ws.readyState === 1 && this.ws.send(Uint8Array.of(0x70)), 30000);
    return connack;
  }
  async onFrame(frame) {
    const p = decodeFrame(frame);
    if (p.type === 4) {
      const waiter = this.pending.get(p.clientSeq);
      if (waiter) { this.pending.delete(p.clientSeq); waiter(p); }
    } else if (p.type === 5) {
      const plain = this.cipher && !(p.setting & 0x10) ? await this.cipher.decrypt(p.payload) : p.payload;
      this.ws.send(new Writer().i64(p.messageId).u32(p.messageSeq).frame(0x60)); // RECVACK
      this.events.recv({ ...p, payload: plain });
    } else if (p.type === 12) {
      this.events.event(p);
    } else if (p.type === 9) {
      this.closeReason = `DISCONNECT reason ${p.reason}${p.text ? `: ${p.text}` : ''}`;
    }
  }
  async send(toUid, text) {
    const clientSeq = ++this.seq;
    const clientMsgNo = `console-${Date.now()}-${clientSeq}`;
    const plain = enc.encode(JSON.stringify({ content: text, type: 1 }));
    let payload = plain;
    let msgKey = '';
    if (this.cipher) {
      payload = await this.cipher.encrypt(plain);
      msgKey = await this.cipher.msgKey(concat(enc.encode(`${clientSeq}${clientMsgNo}${toUid}1`), payload));
    }
    const frame = new Writer().u8(0).u32(clientSeq).str(clientMsgNo).str(toUid).u8(1).u32(0).str(msgKey).bytes(payload).frame(0x30);
    const started = performance.now();
    const ack = new Promise((resolve) => this.pending.set(clientSeq, resolve));
    this.ws.send(frame);
    const p = await ack;
    return { ...p, ms: performance.now() - started };
  }
  close() { clearInterval(this.ping); if (this.ws) this.ws.close(); }
}

// -- playground ------------------------------------------------------------------------------------------
const panes = {};
async function setUpPlayground() {
  let routes;
  try {
    routes = await api('GET', '/admin/cluster?path=/route');
  } catch (exc) {
    if (exc.status !== 401) say('#play-message', `Cannot list the nodes' WebSocket ports: ${exc.message}`, 'error');
    return;
  }
  const wsOf = {};
  for (const node of routes.nodes) {
    if (!node.ok) continue;
    // A node bound to every interface announces 0.0.0.0: reach it on the host this page came from.
    wsOf[node.id] = node.body.ws_addr.replace('//0.0.0.0:', `//${location.hostname}:`);
  }
  const ids = Object.keys(wsOf);
  if (!ids.length) { say('#play-message', 'No node answers.', 'error'); return; }
  say('#play-message', 'Pick two uids (on different nodes to watch a message cross the cluster), connect both, and send.');
  [['a', 'alice', 0], ['b', 'bob', 1]].forEach(([name, uid, index]) => {
    const root = $(`#pane-${name}`);
    if (!panes[name]) {
      root.append($('#pane-template').content.cloneNode(true));
      $('.uid', root).value = uid;
      panes[name] = { root, client: null };
      $('.pane-connect', root).addEventListener('submit', (e) => { e.preventDefault(); togglePane(name); });
      $('.pane-send', root).addEventListener('submit', (e) => { e.preventDefault(); sendFrom(name); });
      $('.stream', root).addEventListener('click', () => streamFrom(name));
    }
    const select = $('.node', root);
    const chosen = select.value;
    select.replaceChildren(...ids.map((id) => el('option', { value: wsOf[id] }, `${id} (${wsOf[id]})`)));
    select.value = chosen && [...select.options].some((o) => o.value === chosen) ? chosen : wsOf[ids[index % ids.length]];
  });
}

function logLine(name, kind, text) {
  const log = $('.log', panes[name].root);
  log.append(el('li', { class: kind }, text));
  while (log.children.length > 200) log.firstChild.remove();
  log.scrollTop = log.scrollHeight;
}

async function togglePane(name) {
  const pane = panes[name];
  const root = pane.root;
  if (pane.client) { pane.client.closeReason = 'closed by you'; pane.client.close(); return; }
  const uid = $('.uid', root).value.trim();
  const url = $('.node', root).value;
  $('.state', root).textContent = 'connecting…';
  const client = new ImClient(url, uid, {
    recv: (p) => {
      let text = dec.decode(p.payload);
      try { const j = JSON.parse(text); if (j && typeof j.content === 'string') text = j.content; } catch (_) { /* raw text */ }
      logLine(name, 'in', `← ${p.fromUid}: ${text}  (seq ${p.messageSeq}, id ${p.messageId})`);
    },
    closed: (why) => {
      pane.client = null;
      $('.state', root).textContent = `offline (${why})`;
      $('.connect', root).textContent = 'Connect';
      $('.send', root).disabled = true;
      $('.stream', root).disabled = true;
      logLine(name, 'sys', `disconnected: ${why}`);
    },
    error: (e) => logLine(name, 'error', `error: ${e.message}`),
    event: (p) => showEvent(name, p),
  });
  try {
    const connack = await client.connect();
    pane.client = client;
    $('.state', root).textContent = `online as ${uid} on node #${connack.nodeId}${client.cipher ? ', encrypted' : ''}`;
    $('.state', root).dataset.online = '1';
    $('.connect', root).textContent = 'Disconnect';
    $('.send', root).disabled = false;
    $('.stream', root).disabled = false;
    logLine(name, 'sys', `connected to ${url} (protocol v${connack.serverVersion})`);
  } catch (exc) {
    $('.state', root).textContent = 'offline';
    logLine(name, 'error', `cannot connect: ${exc.message}`);
    client.close();
  }
}

async function sendFrom(name) {
  const pane = panes[name];
  const other = panes[name === 'a' ? 'b' : 'a'];
  const input = $('.text', pane.root);
  const text = input.value;
  if (!text || !pane.client) return;
  const to = $('.uid', other.root).value.trim();
  input.value = '';
  logLine(name, 'out', `→ ${to}: ${text}`);
  try {
    const ack = await pane.client.send(to, text);
    if (ack.reason === 1) logLine(name, 'ack', `✓ committed: seq ${ack.messageSeq}, id ${ack.messageId}, SENDACK in ${ack.ms.toFixed(1)} ms`);
    else logLine(name, 'error', `✗ refused: SENDACK reason ${ack.reason}`);
  } catch (exc) {
    logLine(name, 'error', `send failed: ${exc.message}`);
  }
}

// A streamed answer as an AI backend sends one: an anchor message (`/message/send` with is_stream 1), then
// its words one by one (`/message/event` stream.delta, kept in memory, no Raft), then stream.finish (through
// Raft, with the whole text). The other pane shows the answer grow from the EVENT packets.
const CANNED_ANSWER = 'Streams grow word by word: each delta reaches every online device at once, '
  + 'and a device that opens the chat later gets the whole answer from messagesync.';
const STREAM_WORD_MS = 80;

async function streamFrom(name) {
  const pane = panes[name];
  const other = panes[name === 'a' ? 'b' : 'a'];
  if (!pane.client) return;
  const from = $('.uid', pane.root).value.trim();
  const to = $('.uid', other.root).value.trim();
  const clientMsgNo = `console-stream-${Date.now()}`;
  const target = { from_uid: from, channel_id: to, channel_type: 1, client_msg_no: clientMsgNo };
  $('.stream', pane.root).disabled = true;
  logLine(name, 'out', `→ ${to}: streaming an answer word by word…`);
  try {
    await api('POST', '/message/send', { ...target, is_stream: 1, payload: btoa('{"type":1,"content":""}') });
    const words = CANNED_ANSWER.split(' ');
    for (let i = 0; i < words.length; i++) {
      const delta = { kind: 'text', delta: (i ? ' ' : '') + words[i] };
      await api('POST', '/message/event', { ...target, event_id: `d${i}`, event_type: 'stream.delta', payload: delta });
      await new Promise((resolve) => setTimeout(resolve, STREAM_WORD_MS));
    }
    const done = await api('POST', '/message/event', { ...target, event_id: 'finish', event_type: 'stream.finish' });
    logLine(name, 'ack', `✓ streamed ${words.length} words; finish committed as event seq ${done.data.msg_event_seq}`);
  } catch (exc) {
    logLine(name, 'error', `stream failed: ${exc.message}`);
  } finally {
    $('.stream', pane.root).disabled = !pane.client;
  }
}

function showEvent(name, p) {
  const pane = panes[name];
  pane.streams = pane.streams || new Map();
  const key = p.data.client_msg_no;
  let line = pane.streams.get(key);
  if (!line) {
    line = { li: el('li', { class: 'in stream' }, `← ${p.data.from_uid} (streaming): `), text: '' };
    pane.streams.set(key, line);
    $('.log', pane.root).append(line.li);
  }
  const payload = p.data.payload || {};
  if (p.eventType === 'stream.delta' && typeof payload.delta === 'string') line.text += payload.delta;
  else if (payload.snapshot && typeof payload.snapshot.text === 'string') line.text = payload.snapshot.text;
  const end = p.data.stream_status && p.data.stream_status !== 'open' ? `  (${p.data.stream_status})` : '';
  line.li.textContent = `← ${p.data.from_uid}: ${line.text}${end}`;
  if (end) pane.streams.delete(key);
}

start();
