// Live queue counts and worker states without polling every object: one summary request every few seconds, on the
// queues and workers pages only.
(function () {
  const table = document.querySelector("table[data-summary]");
  if (!table) return;
  async function refresh() {
    try {
      const response = await fetch(table.dataset.summary, {credentials: "same-origin"});
      if (!response.ok) return;
      const summary = await response.json();
      const serving = {};
      for (const worker of summary.workers) {
        if (worker.state !== "gone") serving[worker.queue] = (serving[worker.queue] || 0) + 1;
        const row = table.querySelector(`tr[data-worker="${CSS.escape(worker.id)}"]`);
        if (!row) continue;
        row.dataset.state = worker.state;
        const state = row.querySelector('[data-field="state"]');
        state.textContent = worker.state;
        state.className = `tag state-${worker.state}`;
        row.querySelector('[data-field="in-flight-count"]').textContent = `${worker.in_flight} / ${worker.max_jobs}`;
        row.querySelector('[data-field="heard"]').textContent = worker.heard;
        row.querySelector('[data-field="per-minute"]').textContent = worker.per_minute;
      }
      for (const stats of summary.queues) {
        const row = table.querySelector(`tr[data-queue="${CSS.escape(stats.queue)}"]`);
        if (!row) continue;
        row.querySelector('[data-field="ready"]').textContent = stats.ready + (stats.exact ? "" : "+");
        row.querySelector('[data-field="running"]').textContent = stats.running;
        row.querySelector('[data-field="deferred"]').textContent = stats.deferred;
        row.querySelector('[data-field="oldest"]').textContent = stats.oldest_ready_age_seconds.toFixed(1) + " s";
        row.querySelector('[data-field="per-minute"]').textContent = stats.per_minute;
        row.querySelector('[data-field="workers"] a').textContent = serving[stats.queue] || 0;
      }
    } catch (error) {
      console.warn("kubearq: refreshing the queue counts and worker states failed", error);
    }
  }
  setInterval(refresh, 5000);
})();
