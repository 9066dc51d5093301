(function(){
  function key(row, col){
    var cell = row.cells[col]; if (!cell) return null;
    var v = cell.getAttribute('data-v'); if (v === null) v = cell.textContent.trim();
    if (v === '') return null;
    var n = Number(v); return isNaN(n) ? v.toLowerCase() : n;
  }
  function compare(a, b, asc){
    if (a === null || b === null) return (a === null) - (b === null);
    var byType = (typeof a === 'string') - (typeof b === 'string');
    if (byType) return byType;
    var c = a < b ? -1 : a > b ? 1 : 0;
    return asc ? c : -c;
  }
  document.querySelectorAll('table.sortable').forEach(function(table){
    var heads = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads, function(th, col){
      th.title = 'click to sort';
      th.addEventListener('click', function(){
        var asc = th.getAttribute('aria-sort') !== 'ascending';
        Array.prototype.forEach.call(heads, function(h){ h.removeAttribute('aria-sort'); });
        th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function(a, b){ return compare(key(a, col), key(b, col), asc); });
        rows.forEach(function(r){ body.appendChild(r); });
      });
    });
  });
})();
