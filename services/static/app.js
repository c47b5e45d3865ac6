// Canopy height web map: layer switcher, legend, height at a click, polygon statistics.
// Plain browser JavaScript on top of the vendored MapLibre GL JS; it talks only to the
// server it was loaded from, so it works without internet access.
(function () {
  'use strict';

  const params = new URLSearchParams(window.location.search);
  const COLORMAP = params.get('colormap') || 'canopy';
  const RESCALE = params.get('rescale') || '0,40';
  const BACKGROUND = '#d9d6cf';
  const DRAW_COLOR = '#e0218a';
  // a click closer than this (px) to the previous vertex adds no vertex (the two clicks
  // of a double-click, a shaky hand)
  const SAME_VERTEX_PX = 4;

  const $ = (id) => document.getElementById(id);
  const el = {
    select: $('layer-select'),
    zoom: $('zoom-button'),
    legendBar: $('legend-bar'),
    legendLabels: $('legend-labels'),
    legendUnits: $('legend-units'),
    pointPanel: $('point-panel'),
    height: $('height-value'),
    spread: $('spread-value'),
    where: $('point-location'),
    draw: $('draw-button'),
    finish: $('finish-button'),
    clear: $('clear-button'),
    stats: $('stats-panel'),
    error: $('error-box'),
  };

  // Everything a test or a curious user may want to look at.
  const state = {
    layers: [],
    current: null, // the layer object from /layers that is shown
    ready: null, // id of the layer once its tiles have been drawn
    drawing: false,
    vertices: [], // [lon, lat] of the polygon being drawn
    polygon: null, // the last finished polygon (a GeoJSON Feature)
    lastPoint: null, // {lon, lat, answer} of the last point query
    lastStatistics: null, // {polygon, answer} of the last statistics request
    errors: [], // every error shown, oldest first
    pointToken: 0,
    statsToken: 0,
    layerToken: 0,
  };
  window.canopyApp = state;

  // ---------------------------------------------------------------- errors

  const ERRORS_SHOWN = 5;

  // the newest errors, as text, in the red box of the side panel (its × empties it)
  function showError(message) {
    const text = String(message);
    state.errors.push(text);
    console.error('[canopy] ' + text);
    if (!el.error.firstChild) {
      const close = document.createElement('button');
      close.type = 'button';
      close.className = 'error-close';
      close.title = 'Dismiss';
      close.textContent = '×';
      close.addEventListener('click', clearError);
      el.error.appendChild(close);
    }
    const line = document.createElement('div');
    line.className = 'error-line';
    line.textContent = text;
    el.error.appendChild(line);
    const lines = el.error.querySelectorAll('.error-line');
    for (let i = 0; i < lines.length - ERRORS_SHOWN; i++) lines[i].remove();
    el.error.hidden = false;
  }

  function clearError() {
    el.error.textContent = '';
    el.error.hidden = true;
  }

  function errorText(err) {
    return err && err.message ? err.message : String(err);
  }

  // ---------------------------------------------------------------- API

  // fetch a JSON answer; any failure becomes an Error whose message says what went wrong
  async function api(path, options) {
    let response;
    try {
      response = await fetch(path, options);
    } catch (err) {
      throw new Error(path + ': the server could not be reached (' + errorText(err) + ')');
    }
    const text = await response.text();
    let body = null;
    try {
      body = text ? JSON.parse(text) : null;
    } catch (err) {
      body = null;
    }
    if (!response.ok) {
      let detail = text || response.statusText;
      if (body && typeof body === 'object') {
        if (body.error) detail = body.error;
        else if (body.detail) detail = typeof body.detail === 'string' ? body.detail : JSON.stringify(body.detail);
      }
      const error = new Error(path.split('?')[0] + ': ' + response.status + ' ' + detail);
      error.status = response.status;
      error.detail = detail;
      throw error;
    }
    if (body === null) throw new Error(path.split('?')[0] + ': the answer is not JSON');
    return body;
  }

  function layerPath(layer, rest) {
    return '/layers/' + encodeURIComponent(layer.id) + rest;
  }

  // ---------------------------------------------------------------- formatting

  function isNumber(v) {
    return typeof v === 'number' && Number.isFinite(v);
  }

  function metres(v, digits) {
    return isNumber(v) ? v.toFixed(digits === undefined ? 1 : digits) + ' m' : 'no data';
  }

  function area(m2) {
    if (!isNumber(m2)) return '–';
    if (m2 >= 1e6) return (m2 / 1e6).toFixed(3) + ' km²';
    if (m2 >= 1e4) return (m2 / 1e4).toFixed(2) + ' ha';
    return m2.toFixed(m2 < 10 ? 2 : 1) + ' m²';
  }

  // canopy cover comes as a fraction of the valid area (0–1)
  function percent(fraction) {
    return isNumber(fraction) ? (fraction * 100).toFixed(1) + ' %' : '–';
  }

  function legendNumber(v) {
    return Number.isInteger(v) ? String(v) : v.toFixed(1);
  }

  // ---------------------------------------------------------------- the map

  if (typeof maplibregl === 'undefined') {
    showError('MapLibre GL JS did not load (/static/vendor/maplibre-gl.js); the map cannot be shown.');
    return;
  }

  let map;
  try {
    map = new maplibregl.Map({
      container: 'map',
      // no external source at all: a plain background under our own raster layers
      style: {
        version: 8,
        sources: {},
        layers: [{ id: 'background', type: 'background', paint: { 'background-color': BACKGROUND } }],
      },
      center: [0, 20],
      zoom: 1,
      maxZoom: 24,
      attributionControl: { compact: true },
    });
  } catch (err) {
    showError('The map could not start (does this browser have WebGL?): ' + errorText(err));
    return;
  }
  window.canopyMap = map;
  map.addControl(new maplibregl.NavigationControl({ showCompass: false }), 'top-right');
  map.addControl(new maplibregl.ScaleControl({ unit: 'metric' }), 'bottom-left');

  const popup = new maplibregl.Popup({ closeButton: true, closeOnClick: false, maxWidth: '240px' });

  map.on('error', (e) => {
    const err = e && e.error;
    const where = e && e.sourceId ? 'tiles of ' + e.sourceId.replace(/^layer-/, 'layer ') + ': ' : 'map: ';
    showError(where + errorText(err || e));
  });

  const EMPTY = { type: 'FeatureCollection', features: [] };
  const mapLoaded = new Promise((resolve) => map.once('load', resolve));

  mapLoaded.then(() => {
    map.addSource('extent', { type: 'geojson', data: EMPTY });
    map.addLayer({
      id: 'extent-line',
      type: 'line',
      source: 'extent',
      paint: { 'line-color': '#333333', 'line-width': 1, 'line-dasharray': [3, 2] },
    });
    map.addSource('draw', { type: 'geojson', data: EMPTY });
    map.addLayer({
      id: 'draw-fill',
      type: 'fill',
      source: 'draw',
      filter: ['==', ['geometry-type'], 'Polygon'],
      paint: { 'fill-color': DRAW_COLOR, 'fill-opacity': 0.15 },
    });
    map.addLayer({
      id: 'draw-line',
      type: 'line',
      source: 'draw',
      filter: ['==', ['geometry-type'], 'LineString'],
      paint: { 'line-color': DRAW_COLOR, 'line-width': 2 },
    });
    map.addLayer({
      id: 'draw-vertices',
      type: 'circle',
      source: 'draw',
      filter: ['==', ['geometry-type'], 'Point'],
      paint: {
        'circle-radius': 4,
        'circle-color': '#ffffff',
        'circle-stroke-color': DRAW_COLOR,
        'circle-stroke-width': 2,
      },
    });
  });

  // ---------------------------------------------------------------- layers

  async function loadLayers() {
    const answer = await api('/layers');
    const layers = Array.isArray(answer.layers) ? answer.layers : [];
    state.layers = layers;
    el.select.textContent = '';
    if (!layers.length) {
      const option = document.createElement('option');
      option.value = '';
      option.textContent = 'no layers';
      el.select.appendChild(option);
      showError('The server lists no layers.');
      return;
    }
    for (const layer of layers) {
      const option = document.createElement('option');
      option.value = layer.id;
      option.textContent = (layer.name || layer.id) + (layer.kind ? ' (' + layer.kind + ')' : '');
      el.select.appendChild(option);
    }
    el.select.disabled = false;
    const wanted = layers.find((l) => l.id === params.get('layer')) || layers[0];
    el.select.value = wanted.id;
    showLayer(wanted.id, { animate: false }).catch((err) => showError('layer ' + wanted.id + ': ' + errorText(err)));
  }

  function sourceId(layer) {
    return 'layer-' + layer.id;
  }

  function layerBounds(layer, tilejson) {
    const b = (tilejson && tilejson.bounds) || layer.bounds;
    return Array.isArray(b) && b.length === 4 && b.every(isNumber) ? b : null;
  }

  async function addLayerSource(layer) {
    const id = sourceId(layer);
    if (map.getSource(id)) return;
    const query = new URLSearchParams({ colormap: COLORMAP, rescale: RESCALE });
    const tilejson = await api(layerPath(layer, '/tilejson.json?' + query.toString()));
    if (!Array.isArray(tilejson.tiles) || !tilejson.tiles.length) {
      throw new Error('the TileJSON of layer ' + layer.id + ' lists no tiles');
    }
    if (map.getSource(id)) return; // added meanwhile by another call
    const source = {
      type: 'raster',
      tiles: tilejson.tiles,
      tileSize: 256,
      minzoom: isNumber(tilejson.minzoom) ? tilejson.minzoom : 0,
      maxzoom: isNumber(tilejson.maxzoom) ? tilejson.maxzoom : 22,
    };
    const bounds = layerBounds(layer, tilejson);
    if (bounds) source.bounds = bounds;
    if (tilejson.attribution) source.attribution = tilejson.attribution;
    layer.tilejson = tilejson;
    map.addSource(id, source);
    // under the extent outline and the drawing
    map.addLayer({ id: id, type: 'raster', source: id, paint: { 'raster-fade-duration': 0 } }, 'extent-line');
  }

  async function showLayer(layerId, options) {
    const animate = !options || options.animate !== false;
    const layer = state.layers.find((l) => l.id === layerId);
    if (!layer) throw new Error('unknown layer ' + layerId);
    const token = ++state.layerToken;
    state.current = layer;
    state.ready = null;
    delete document.body.dataset.ready;
    clearPoint();
    await mapLoaded;
    await addLayerSource(layer);
    if (token !== state.layerToken) return; // another layer was chosen meanwhile
    for (const other of state.layers) {
      if (map.getLayer(sourceId(other))) {
        map.setLayoutProperty(sourceId(other), 'visibility', other === layer ? 'visible' : 'none');
      }
    }
    const bounds = layerBounds(layer, layer.tilejson);
    map.getSource('extent').setData(bounds ? extentFeature(bounds) : EMPTY);
    fitToLayer(layer, animate);
    map.once('idle', () => {
      if (token !== state.layerToken) return;
      state.ready = layer.id;
      document.body.dataset.ready = layer.id;
    });
    map.triggerRepaint();
    if (state.polygon) requestStatistics(state.polygon);
  }

  function extentFeature(b) {
    const [w, s, e, n] = b;
    return {
      type: 'Feature',
      properties: {},
      geometry: { type: 'LineString', coordinates: [[w, s], [e, s], [e, n], [w, n], [w, s]] },
    };
  }

  function fitToLayer(layer, animate) {
    const b = layerBounds(layer, layer.tilejson);
    if (!b) {
      showError('layer ' + layer.id + ' has no bounds to zoom to');
      return;
    }
    map.fitBounds(
      [[b[0], b[1]], [b[2], b[3]]],
      { padding: 30, maxZoom: map.getMaxZoom(), animate: animate, duration: animate ? 800 : 0 }
    );
  }

  el.select.addEventListener('change', () => {
    showLayer(el.select.value).catch((err) => showError('layer ' + el.select.value + ': ' + errorText(err)));
  });
  el.zoom.addEventListener('click', () => {
    if (state.current) fitToLayer(state.current, true);
  });

  // ---------------------------------------------------------------- legend

  async function loadLegend() {
    const query = new URLSearchParams({ rescale: RESCALE });
    const cmap = await api('/colormaps/' + encodeURIComponent(COLORMAP) + '?' + query.toString());
    const stops = (cmap.stops || []).filter((s) => Array.isArray(s) && isNumber(s[0]) && typeof s[1] === 'string');
    if (stops.length < 2) throw new Error('colormap ' + COLORMAP + ' has fewer than two stops');
    const lo = stops[0][0];
    const hi = stops[stops.length - 1][0];
    const span = hi - lo || 1;
    const pos = (v) => ((100 * (v - lo)) / span).toFixed(2) + '%';
    el.legendBar.style.background =
      'linear-gradient(to right, ' + stops.map((s) => s[1] + ' ' + pos(s[0])).join(', ') + ')';
    el.legendUnits.textContent = '(' + (cmap.units || 'm') + ')';
    el.legendLabels.textContent = '';
    // a label per stop when there are few, else five evenly spread values
    const values = stops.length <= 6 ? stops.map((s) => s[0]) : [0, 0.25, 0.5, 0.75, 1].map((t) => lo + t * span);
    values.forEach((v, i) => {
      const label = document.createElement('span');
      label.style.left = pos(v);
      label.textContent = legendNumber(v) + (i === values.length - 1 ? '+' : '');
      el.legendLabels.appendChild(label);
    });
    el.legendBar.title = 'canopy height, ' + legendNumber(lo) + '–' + legendNumber(hi) + ' ' + (cmap.units || 'm');
    el.legendBar.dataset.colormap = cmap.name || COLORMAP;
  }

  // ---------------------------------------------------------------- height at a click

  function clearPoint() {
    state.pointToken++;
    el.height.textContent = '–';
    el.spread.textContent = '–';
    el.where.textContent = '–';
    delete el.height.dataset.value;
    delete el.pointPanel.dataset.lon;
    delete el.pointPanel.dataset.lat;
    el.pointPanel.dataset.state = 'empty';
    popup.remove();
  }

  function showPopup(lngLat, heading, detail) {
    const box = document.createElement('div');
    const strong = document.createElement('strong');
    strong.textContent = heading;
    box.appendChild(strong);
    if (detail) {
      const small = document.createElement('div');
      small.className = 'hint';
      small.textContent = detail;
      box.appendChild(small);
    }
    popup.setLngLat(lngLat).setDOMContent(box);
    if (!popup.isOpen()) popup.addTo(map);
  }

  async function queryPoint(lngLat) {
    const layer = state.current;
    if (!layer) {
      showError('choose a layer first');
      return;
    }
    const token = ++state.pointToken;
    const lon = lngLat.lng;
    const lat = lngLat.lat;
    el.pointPanel.dataset.state = 'loading';
    el.pointPanel.dataset.lon = String(lon);
    el.pointPanel.dataset.lat = String(lat);
    el.height.textContent = '…';
    el.spread.textContent = '…';
    delete el.height.dataset.value;
    el.where.textContent = lat.toFixed(6) + ', ' + lon.toFixed(6);
    showPopup(lngLat, '…');
    const query = new URLSearchParams({ lon: String(lon), lat: String(lat) });
    try {
      const answer = await api(layerPath(layer, '/point?' + query.toString()));
      if (token !== state.pointToken) return;
      state.lastPoint = { lon: lon, lat: lat, layer: layer.id, answer: answer };
      const units = answer.units || 'm';
      if (isNumber(answer.height)) {
        el.height.textContent = answer.height.toFixed(1) + ' ' + units;
        el.height.dataset.value = String(answer.height);
      } else {
        el.height.textContent = 'no data';
      }
      el.spread.textContent = isNumber(answer.spread) ? '± ' + answer.spread.toFixed(1) + ' ' + units : '–';
      el.pointPanel.dataset.state = isNumber(answer.height) ? 'value' : 'nodata';
      showPopup(
        lngLat,
        isNumber(answer.height) ? 'Height ' + el.height.textContent : 'no data',
        isNumber(answer.spread) ? 'spread ' + el.spread.textContent : ''
      );
    } catch (err) {
      if (token !== state.pointToken) return;
      state.lastPoint = { lon: lon, lat: lat, layer: layer.id, error: errorText(err) };
      el.spread.textContent = '–';
      if (err.status === 404) {
        // outside the layer: not a failure of the page, but say what the server said
        el.height.textContent = 'no data';
        el.pointPanel.dataset.state = 'nodata';
        showPopup(lngLat, 'no data', err.detail || errorText(err));
      } else {
        el.height.textContent = 'error';
        el.pointPanel.dataset.state = 'error';
        showPopup(lngLat, 'error', errorText(err));
        showError('height at ' + lat.toFixed(6) + ', ' + lon.toFixed(6) + ': ' + errorText(err));
      }
    }
  }

  // ---------------------------------------------------------------- drawing a polygon

  function drawFeatures(cursor) {
    const features = [];
    const v = state.vertices;
    const closed = !state.drawing && v.length >= 3;
    if (closed) {
      features.push({ type: 'Feature', properties: {}, geometry: { type: 'Polygon', coordinates: [v.concat([v[0]])] } });
      features.push({ type: 'Feature', properties: {}, geometry: { type: 'LineString', coordinates: v.concat([v[0]]) } });
    } else {
      const line = cursor ? v.concat([cursor]) : v.slice();
      if (line.length >= 3) {
        features.push({ type: 'Feature', properties: {}, geometry: { type: 'Polygon', coordinates: [line.concat([line[0]])] } });
      }
      if (line.length >= 2) {
        features.push({ type: 'Feature', properties: {}, geometry: { type: 'LineString', coordinates: line } });
      }
    }
    for (const p of v) features.push({ type: 'Feature', properties: {}, geometry: { type: 'Point', coordinates: p } });
    return { type: 'FeatureCollection', features: features };
  }

  function renderDrawing(cursor) {
    const source = map.getSource('draw');
    if (source) source.setData(drawFeatures(cursor));
  }

  function setDrawButtons() {
    el.draw.setAttribute('aria-pressed', state.drawing ? 'true' : 'false');
    el.draw.textContent = state.drawing ? 'Cancel drawing' : 'Draw polygon';
    el.finish.disabled = !state.drawing || state.vertices.length < 3;
    el.clear.disabled = !state.drawing && !state.vertices.length && !state.polygon;
    map.getContainer().classList.toggle('drawing', state.drawing);
    document.body.dataset.drawing = state.drawing ? 'true' : 'false';
  }

  function startDrawing() {
    state.drawing = true;
    state.vertices = [];
    state.polygon = null;
    popup.remove();
    map.doubleClickZoom.disable();
    renderDrawing();
    setDrawButtons();
  }

  function stopDrawing() {
    state.drawing = false;
    // re-enabled after the double-click that may have ended the drawing is handled
    setTimeout(() => map.doubleClickZoom.enable(), 0);
    setDrawButtons();
  }

  function cancelDrawing() {
    state.vertices = [];
    stopDrawing();
    renderDrawing();
  }

  function addVertex(e) {
    const last = state.vertices[state.vertices.length - 1];
    if (last) {
      const p = map.project(last);
      if (Math.hypot(p.x - e.point.x, p.y - e.point.y) < SAME_VERTEX_PX) return;
    }
    const ll = e.lngLat.wrap();
    state.vertices.push([ll.lng, ll.lat]);
    renderDrawing();
    setDrawButtons();
  }

  function finishDrawing() {
    if (!state.drawing) return;
    if (state.vertices.length < 3) {
      showError('a polygon needs at least 3 vertices (it has ' + state.vertices.length + ')');
      return;
    }
    const ring = state.vertices.concat([state.vertices[0]]);
    state.polygon = { type: 'Feature', properties: {}, geometry: { type: 'Polygon', coordinates: [ring] } };
    stopDrawing();
    renderDrawing();
    requestStatistics(state.polygon);
  }

  function clearDrawing() {
    state.statsToken++;
    state.polygon = null;
    state.vertices = [];
    if (state.drawing) stopDrawing();
    renderDrawing();
    setDrawButtons();
    el.stats.dataset.state = 'empty';
    el.stats.textContent = '';
    const p = document.createElement('p');
    p.className = 'hint';
    p.textContent = 'No polygon yet.';
    el.stats.appendChild(p);
  }

  el.draw.addEventListener('click', () => {
    if (state.drawing) cancelDrawing();
    else startDrawing();
  });
  el.finish.addEventListener('click', finishDrawing);
  el.clear.addEventListener('click', clearDrawing);

  document.addEventListener('keydown', (e) => {
    if (!state.drawing) return;
    if (e.key === 'Escape') {
      cancelDrawing();
    } else if (e.key === 'Enter') {
      finishDrawing();
    } else if (e.key === 'Backspace' || e.key === 'Delete') {
      if (document.activeElement && /^(INPUT|SELECT|TEXTAREA)$/.test(document.activeElement.tagName)) return;
      e.preventDefault();
      state.vertices.pop();
      renderDrawing();
      setDrawButtons();
    }
  });

  map.on('click', (e) => {
    if (state.drawing) addVertex(e);
    else queryPoint(e.lngLat.wrap());
  });
  map.on('dblclick', (e) => {
    if (!state.drawing) return;
    e.preventDefault();
    finishDrawing();
  });
  map.on('mousemove', (e) => {
    if (state.drawing && state.vertices.length) {
      const ll = e.lngLat.wrap();
      renderDrawing([ll.lng, ll.lat]);
    }
  });

  // ---------------------------------------------------------------- polygon statistics

  const STAT_ROWS = [
    ['mean', 'Mean height', (v) => metres(v, 2)],
    ['median', 'Median height', (v) => metres(v, 2)],
    ['p95', '95th percentile', (v) => metres(v, 2)],
    ['cover_2m', 'Canopy cover ≥ 2 m', percent],
    ['cover_5m', 'Canopy cover ≥ 5 m', percent],
    ['area_m2', 'Area', area],
    ['nodata_area_m2', 'No-data area', area],
    ['valid_pixels', 'Valid pixels', (v) => (isNumber(v) ? String(v) : '–')],
  ];

  function statsMessage(text, stateName) {
    el.stats.textContent = '';
    const p = document.createElement('p');
    p.className = stateName === 'error' ? 'error' : 'hint';
    p.textContent = text;
    el.stats.appendChild(p);
    el.stats.dataset.state = stateName;
  }

  function renderStatistics(layer, s) {
    el.stats.textContent = '';
    const caption = document.createElement('p');
    caption.className = 'hint';
    caption.textContent = 'Layer ' + (layer.name || layer.id);
    el.stats.appendChild(caption);
    const table = document.createElement('table');
    const addRow = (key, label, value, text, cls) => {
      const tr = document.createElement('tr');
      if (cls) tr.className = cls;
      const th = document.createElement('th');
      th.textContent = label;
      const td = document.createElement('td');
      td.id = 'stat-' + key;
      td.textContent = text;
      if (isNumber(value)) td.dataset.value = String(value);
      tr.appendChild(th);
      tr.appendChild(td);
      table.appendChild(tr);
    };
    for (const [key, label, format] of STAT_ROWS) addRow(key, label, s[key], format(s[key]));
    const classes = s.area_by_class_m2;
    if (classes && typeof classes === 'object') {
      const keys = Object.keys(classes);
      if (keys.length) {
        const tr = document.createElement('tr');
        const th = document.createElement('th');
        th.colSpan = 2;
        th.textContent = 'Area by height class';
        tr.appendChild(th);
        table.appendChild(tr);
      }
      keys.forEach((k, i) => addRow('class-' + i, k + (/[a-z]$/i.test(k) ? '' : ' m'), classes[k], area(classes[k]), 'sub'));
    }
    el.stats.appendChild(table);
    if (s.repaired) {
      const note = document.createElement('p');
      note.className = 'hint';
      note.textContent = 'The polygon was not valid (it crosses itself?); the server repaired it first.';
      el.stats.appendChild(note);
    }
    if (!isNumber(s.mean)) {
      const note = document.createElement('p');
      note.className = 'hint';
      note.textContent = 'No pixel with data inside the polygon.';
      el.stats.appendChild(note);
    }
    el.stats.dataset.state = 'done';
  }

  async function requestStatistics(feature) {
    const layer = state.current;
    if (!layer) {
      showError('choose a layer first');
      return;
    }
    const token = ++state.statsToken;
    statsMessage('Computing statistics…', 'loading');
    try {
      const answer = await api(layerPath(layer, '/statistics'), {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify(feature),
      });
      if (token !== state.statsToken) return;
      const first = Array.isArray(answer.features) ? answer.features[0] : null;
      if (!first || typeof first !== 'object') throw new Error('the statistics answer has no feature');
      // flat statistics, or a GeoJSON Feature carrying them in its properties
      const s = first.properties && typeof first.properties === 'object' && !('mean' in first) ? first.properties : first;
      state.lastStatistics = { layer: layer.id, polygon: feature, answer: answer };
      renderStatistics(layer, s);
    } catch (err) {
      if (token !== state.statsToken) return;
      state.lastStatistics = { layer: layer.id, polygon: feature, error: errorText(err) };
      statsMessage('Statistics failed: ' + errorText(err), 'error');
      showError('statistics: ' + errorText(err));
    }
  }

  // ---------------------------------------------------------------- start

  setDrawButtons();
  loadLegend().catch((err) => {
    el.legendLabels.textContent = 'legend unavailable';
    showError('legend: ' + errorText(err));
  });
  loadLayers().catch((err) => {
    el.select.textContent = '';
    const option = document.createElement('option');
    option.textContent = 'layers unavailable';
    el.select.appendChild(option);
    showError('layers: ' + errorText(err));
  });
})();
