// Live queue counts without polling every object: one summary request every few seconds, only on the queues page.
(function () {
  const table = document.querySelector("table[data-summary]");
  if (!table) return;
  async function refresh() {
    try {
      const response = await fetch(table.dataset.summary, {credentials: "same-origin"});
      if (!response.ok) return;
      const summary = await response.json();
      for (const stats of summary.queues) {
        const row = table.querySelector(`tr[data-queue="${CSS.escape(stats.queue)}"]`);
        if (!row) continue;
        row.querySelector('[data-field="ready"]').textContent = stats.ready + (stats.exact ? "" : "+");
        row.querySelector('[data-field="running"]').textContent = stats.running;
        row.querySelector('[data-field="deferred"]').textContent = stats.deferred;
        row.querySelector('[data-field="oldest"]').textContent = stats.oldest_ready_age_seconds.toFixed(1) + " s";
      }
    } catch (error) {
      console.warn("kubearq: refreshing the queue counts failed", error);
    }
  }
  setInterval(refresh, 5000);
})();
