// The one script: the box in a letters table's head ticks or clears every box below it.
document.addEventListener("DOMContentLoaded", () => {
  const all = document.getElementById("all-boxes");
  if (all) all.addEventListener("change", () => {
    document.querySelectorAll('input[name="id"][type="checkbox"]').forEach((box) => { box.checked = all.checked; });
  });
});
