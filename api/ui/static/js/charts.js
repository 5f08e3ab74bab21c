// Charts on Chart.js (vendor/chart.umd.min.js, MIT, loaded as window.Chart): the sensitivity
// profile, two profiles compared, and the Pareto plot of a budget sweep. A bar's colour is its
// chosen bit width; the measured-error line of a width has that width's colour.

import { h } from './dom.js';

const BIT_COLORS = { 2: '#c0392b', 3: '#e67e22', 4: '#2e86de', 8: '#27ae60', 16: '#7f8c8d' };
const PAIR = ['#2e86de', '#d35400'];
const MUTED = '#b0b7c3';

export function bitColor(bits) {
  return BIT_COLORS[bits] || MUTED;
}

function library() {
  if (!window.Chart) throw new Error('the chart library (vendor/chart.umd.min.js) did not load');
  return window.Chart;
}

/** A canvas in a sized box (Chart.js needs a positioned parent to be responsive). */
export function chartBox(id, label, tall = false) {
  const canvas = h('canvas', { id, role: 'img', 'aria-label': label });
  return { box: h('div', { class: tall ? 'chart tall' : 'chart' }, canvas), canvas };
}

function mount(canvas, config) {
  const Chart = library();
  const existing = Chart.getChart(canvas);
  if (existing) existing.destroy();
  return new Chart(canvas, config);
}

// the legend entry of a bar dataset coloured per bar shows a neutral swatch instead of the first bar's colour
function neutralBarLegend(chart) {
  const labels = library().defaults.plugins.legend.labels.generateLabels(chart);
  for (const label of labels) {
    const ds = chart.data.datasets[label.datasetIndex];
    if (ds && Array.isArray(ds.backgroundColor)) { label.fillStyle = '#9aa3af'; label.strokeStyle = '#9aa3af'; }
  }
  return labels;
}

function baseOptions() {
  return {
    responsive: true,
    maintainAspectRatio: false,
    animation: { duration: 200 },
    interaction: { mode: 'index', intersect: false },
    plugins: { legend: { position: 'bottom', labels: { boxWidth: 12, font: { size: 11 }, generateLabels: neutralBarLegend } } },
  };
}

/** HTML legend for the bar colours. */
export function bitLegend(widths, unallocated = false) {
  return h('p', { class: 'legend small' }, 'bar colour = chosen bits: ',
    widths.map((b) => h('span', { class: 'swatch-item' }, h('span', { class: `swatch bits-${b}` }), `${b}`)),
    unallocated ? h('span', { class: 'swatch-item' }, h('span', { class: 'swatch bits-none' }), 'not allocated / mixed') : null);
}

/**
 * The profile: bars = the chosen metric per layer (or per linear), coloured by chosen bits; lines
 * = the measured relative output error at each allowed width (log axis on the right).
 * data: {labels, names, values, metricLabel, bits: [int|null], errors: {width: [number|null]}}
 */
export function profileChart(canvas, data) {
  const errorSets = Object.entries(data.errors || {}).map(([width, values]) => ({
    type: 'line', label: `measured error at ${width} bit`, yAxisID: 'err', order: 1,
    data: values.map((v) => (typeof v === 'number' && v > 0 ? v : null)),
    borderColor: bitColor(Number(width)), backgroundColor: bitColor(Number(width)),
    borderWidth: 1.5, pointRadius: data.labels.length > 60 ? 0 : 2, spanGaps: true,
  }));
  const options = baseOptions();
  options.scales = {
    x: { ticks: { autoSkip: true, maxRotation: 60, font: { size: 10 } } },
    y: { title: { display: true, text: data.metricLabel } },
  };
  if (errorSets.length) {
    options.scales.err = { type: 'logarithmic', position: 'right', grid: { drawOnChartArea: false },
      title: { display: true, text: 'relative output error (log)' } };
  }
  options.plugins.tooltip = {
    callbacks: {
      title: (items) => (items.length ? data.names[items[0].dataIndex] : ''),
      afterTitle: (items) => {
        if (!items.length) return '';
        const b = data.bits[items[0].dataIndex];
        return b === null || b === undefined ? 'bits: not allocated' : `chosen bits: ${b}`;
      },
    },
  };
  return mount(canvas, {
    type: 'bar',
    data: {
      labels: data.labels,
      datasets: [{ type: 'bar', label: data.metricLabel, data: data.values, yAxisID: 'y', order: 2,
        backgroundColor: data.bits.map((b) => bitColor(b)) }, ...errorSets],
    },
    options,
  });
}

/**
 * Two profiles on one chart: lines for the metric (left axis), dashed steps for each job's chosen
 * bits (right axis). data: {labels, metricLabel, series: [{label, values, bits}]}
 */
export function compareChart(canvas, data) {
  const datasets = [];
  data.series.forEach((s, i) => {
    datasets.push({ type: 'line', label: s.label, data: s.values, yAxisID: 'y', borderColor: PAIR[i], backgroundColor: PAIR[i],
      borderWidth: 2, pointRadius: 3, spanGaps: true });
  });
  data.series.forEach((s, i) => {
    if (s.bits.some((b) => b !== null && b !== undefined)) {
      datasets.push({ type: 'line', label: `${s.label}: bits`, data: s.bits, yAxisID: 'bits', borderColor: PAIR[i],
        backgroundColor: PAIR[i], borderDash: [6, 4], borderWidth: 1.5, pointRadius: 0, stepped: 'middle', spanGaps: true });
    }
  });
  const options = baseOptions();
  options.scales = {
    x: { ticks: { autoSkip: true, maxRotation: 60, font: { size: 10 } }, title: { display: true, text: 'layer' } },
    y: { title: { display: true, text: data.metricLabel } },
    bits: { position: 'right', min: 0, suggestedMax: 16, grid: { drawOnChartArea: false }, title: { display: true, text: 'chosen bits' } },
  };
  return mount(canvas, { type: 'line', data: { labels: data.labels, datasets }, options });
}

// vertical interval bars ({low, high} on each point) for the Pareto plot
const intervalPlugin = {
  id: 'taqIntervals',
  afterDatasetsDraw(chart) {
    const { ctx } = chart;
    const y = chart.scales.y;
    chart.data.datasets.forEach((ds, i) => {
      if (!ds.intervals || !chart.isDatasetVisible(i)) return;
      const meta = chart.getDatasetMeta(i);
      const area = chart.chartArea;
      ctx.save();
      ctx.beginPath();
      ctx.rect(area.left, area.top, area.right - area.left, area.bottom - area.top);
      ctx.clip();
      ctx.strokeStyle = ds.borderColor;
      ctx.lineWidth = 1.5;
      ds.data.forEach((point, j) => {
        if (typeof point.low !== 'number' || typeof point.high !== 'number' || !meta.data[j]) return;
        const x = meta.data[j].x;
        const top = y.getPixelForValue(point.high);
        const bottom = y.getPixelForValue(point.low);
        ctx.beginPath();
        ctx.moveTo(x, top); ctx.lineTo(x, bottom);
        ctx.moveTo(x - 4, top); ctx.lineTo(x + 4, top);
        ctx.moveTo(x - 4, bottom); ctx.lineTo(x + 4, bottom);
        ctx.stroke();
      });
      ctx.restore();
    });
  },
};

const VARIANT_COLORS = ['#2e86de', '#8e44ad', '#16a085', '#d35400', '#c0392b', '#2c3e50'];

/**
 * Task score against effective bits across a sweep's budgets. data: {metricLabel, series:
 * [{label, points: [{x, y, low, high, budget}]}], reference: {label, y, low, high} | null}
 */
export function paretoChart(canvas, data) {
  const xs = data.series.flatMap((s) => s.points.map((p) => p.x));
  const lo = Math.min(...xs) - 0.25;
  const hi = Math.max(...xs) + 0.25;
  const datasets = data.series.map((s, i) => ({
    type: 'scatter', label: s.label, data: s.points, showLine: true, intervals: true,
    borderColor: VARIANT_COLORS[i % VARIANT_COLORS.length], backgroundColor: VARIANT_COLORS[i % VARIANT_COLORS.length],
    pointRadius: 4, borderWidth: 1.5,
  }));
  if (data.reference && typeof data.reference.y === 'number') {
    datasets.push({ type: 'scatter', label: data.reference.label, showLine: true, borderDash: [6, 4], pointRadius: 0,
      borderColor: '#7f8c8d', backgroundColor: '#7f8c8d', borderWidth: 1.5,
      data: [{ x: lo, y: data.reference.y }, { x: hi, y: data.reference.y }] });
  }
  const options = baseOptions();
  options.interaction = { mode: 'nearest', intersect: false };
  const ys = data.series.flatMap((s) => s.points.flatMap((p) => [p.y, p.low, p.high]))
    .concat(data.reference ? [data.reference.y] : []).filter((v) => typeof v === 'number');
  const pad = (Math.max(...ys) - Math.min(...ys)) * 0.08 || Math.abs(ys[0] || 1) * 0.01;
  options.scales = {
    x: { type: 'linear', min: lo, max: hi, title: { display: true, text: 'effective bits' } },
    y: { suggestedMin: Math.min(...ys) - pad, suggestedMax: Math.max(...ys) + pad, title: { display: true, text: data.metricLabel } },
  };
  options.plugins.tooltip = {
    callbacks: {
      label: (item) => {
        const p = item.raw;
        const interval = typeof p.low === 'number' ? ` [${p.low.toPrecision(4)}, ${p.high.toPrecision(4)}]` : '';
        const budget = p.budget !== undefined ? ` (budget ${p.budget})` : '';
        return `${item.dataset.label}: ${Number(p.y).toPrecision(4)}${interval} at ${Number(p.x).toFixed(3)} bits${budget}`;
      },
    },
  };
  return mount(canvas, { type: 'scatter', data: { datasets }, options, plugins: [intervalPlugin] });
}
