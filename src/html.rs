//! The `compare --html` page: the images side by side, the prompt and every parameter, and a pairwise
//! rating form in the spirit of the paper's human study (for each seed and each pair of modes: which
//! is better, or the same). It is one static file next to the images: no server, no network. Ratings
//! are kept in the browser's localStorage and exported as JSON.

use crate::metadata::GridMetadata;

/// Escapes text for HTML element content and attribute values.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&#39;")
}

/// JSON made safe to embed in a <script> block: `<`, `>`, `&` as \u003c, \u003e, \u0026 (they can
/// only occur inside JSON strings, where the escapes mean the same characters).
fn script_json(json: &str) -> String {
    json.replace('<', "\\u003c").replace('>', "\\u003e").replace('&', "\\u0026")
}

/// The page for a grid; `render_sizes` lists (mode, size) where the UNet ran at another size.
pub fn compare_page(meta: &GridMetadata, grid_file: &str, render_sizes: &[(String, (usize, usize))]) -> String {
    let mut parameters = vec![
        ("Negative prompt", if meta.negative_prompt.is_empty() { "—".into() } else { meta.negative_prompt.clone() }),
        ("Size", format!("{}×{}", meta.width, meta.height)),
        ("Steps", meta.steps.to_string()),
        ("CFG scale", meta.guidance.to_string()),
        (
            "Sampler",
            match meta.sampler_settings {
                Some(spec) => spec.label(),
                None => meta.sampler.clone(),
            },
        ),
        ("Seeds", meta.seeds.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")),
        ("Modes", meta.modes.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(", ")),
        ("Model", meta.model.clone()),
        ("Revision", meta.revision.clone().unwrap_or_else(|| "—".into())),
        ("Precision", meta.dtype.clone()),
        ("Device", meta.device.clone()),
        ("sdscale", meta.version.clone()),
    ];
    for (mode, (width, height)) in render_sizes {
        parameters.push(("Render size", format!("{mode}: {width}×{height}, then Lanczos3")));
    }
    let parameter_rows: String = parameters
        .iter()
        .map(|(key, value)| format!("<tr><th>{}</th><td>{}</td></tr>\n", escape(key), escape(value)))
        .collect();

    let header: String = meta.modes.iter().map(|m| format!("<th>{}</th>", m.as_str())).collect();
    let mut rows = String::new();
    for seed in &meta.seeds {
        rows.push_str(&format!("<tr><th>seed {seed}</th>"));
        for mode in &meta.modes {
            let cell = meta.cells.iter().find(|c| c.seed == *seed && c.mode == *mode).expect("a cell per pair");
            rows.push_str(&format!(
                "<td><img src=\"{src}\" width=\"{w}\" height=\"{h}\" alt=\"{mode}, seed {seed}\" title=\"{src}\"></td>",
                src = escape(&cell.file),
                w = meta.width,
                h = meta.height,
                mode = mode.as_str()
            ));
        }
        rows.push_str("</tr>\n");
    }

    let mut rating = String::new();
    for seed in &meta.seeds {
        for (i, a) in meta.modes.iter().enumerate() {
            for b in &meta.modes[i + 1..] {
                let (a, b) = (a.as_str(), b.as_str());
                let name = format!("seed{seed}-{a}-{b}");
                rating.push_str(&format!(
                    "<fieldset class=\"pair\" data-seed=\"{seed}\" data-a=\"{a}\" data-b=\"{b}\"><legend>seed {seed}: {a} vs {b}</legend>\
<label><input type=\"radio\" name=\"{name}\" value=\"{a}\"> {a} better</label> \
<label><input type=\"radio\" name=\"{name}\" value=\"same\"> same</label> \
<label><input type=\"radio\" name=\"{name}\" value=\"{b}\"> {b} better</label></fieldset>\n"
                ));
            }
        }
    }
    // The settings travel with exported ratings. Inside <script>, `</script>` would end the block and
    // `<!--<script>` would make the parser swallow the real `</script>`: with `<`, `>` and `&` written
    // as JSON escapes, no prompt can change how the page parses (the values stay the same).
    let settings = script_json(&serde_json::to_string(meta).expect("plain data"));
    let title = escape(&meta.prompt);
    let grid_file = escape(grid_file);
    format!(
        r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="generator" content="sdscale {version}">
<title>sdscale compare: {title}</title>
<style>
body {{ font: 15px/1.4 system-ui, sans-serif; margin: 1.5em; color: #1a1a1a; }}
h1 {{ font-size: 1.3em; }}
table.params th {{ text-align: left; padding-right: 1em; font-weight: 600; }}
table.images th {{ padding: 0.3em 0.6em; }}
table.images td {{ padding: 2px; }}
table.images img {{ display: block; image-rendering: auto; }}
fieldset.pair {{ display: inline-block; margin: 0.3em; border: 1px solid #ccc; }}
#export-json {{ white-space: pre-wrap; background: #f4f4f4; padding: 0.5em; max-height: 20em; overflow: auto; }}
</style>
</head>
<body>
<h1>{title}</h1>
<table class="params">
{parameter_rows}</table>
<h2>Images</h2>
<table class="images">
<tr><th></th>{header}</tr>
{rows}</table>
<p>The same images as one picture: <a href="{grid_file}">{grid_file}</a>.</p>
<h2>Rate</h2>
<p>For each seed and each pair of modes, which image is better? Ratings stay in this browser (localStorage).</p>
<form id="ratings">
{rating}</form>
<p><button type="button" id="export">Export ratings (JSON)</button> <button type="button" id="clear">Clear ratings</button>
<span id="count"></span></p>
<pre id="export-json"></pre>
<script>
"use strict";
const SETTINGS = {settings};
const KEY = "sdscale-ratings:" + location.pathname;

function load() {{
  try {{ return JSON.parse(localStorage.getItem(KEY) || "{{}}"); }} catch (e) {{ return {{}}; }}
}}
function save(ratings) {{ localStorage.setItem(KEY, JSON.stringify(ratings)); }}
function pairs() {{ return Array.from(document.querySelectorAll("fieldset.pair")); }}
function keyOf(f) {{ return f.dataset.seed + "/" + f.dataset.a + "/" + f.dataset.b; }}
function showCount() {{
  const n = Object.keys(load()).length;
  document.getElementById("count").textContent = n + " of " + pairs().length + " pairs rated";
}}
function restore() {{
  const ratings = load();
  for (const f of pairs()) {{
    const value = ratings[keyOf(f)];
    for (const input of f.querySelectorAll("input")) input.checked = input.value === value;
  }}
  showCount();
}}
function exportRatings() {{
  const ratings = load();
  const list = pairs().filter(f => keyOf(f) in ratings).map(f => ({{
    seed: Number(f.dataset.seed), a: f.dataset.a, b: f.dataset.b, choice: ratings[keyOf(f)]
  }}));
  const text = JSON.stringify({{ settings: SETTINGS, ratings: list, exported: new Date().toISOString() }}, null, 2);
  document.getElementById("export-json").textContent = text;
  return text;
}}
document.getElementById("ratings").addEventListener("change", event => {{
  const f = event.target.closest("fieldset.pair");
  const ratings = load();
  ratings[keyOf(f)] = event.target.value;
  save(ratings);
  showCount();
}});
document.getElementById("export").addEventListener("click", () => {{
  const text = exportRatings();
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([text], {{ type: "application/json" }}));
  link.download = location.pathname.split("/").pop().replace(/\.html$/, "") + ".ratings.json";
  link.click();
}});
document.getElementById("clear").addEventListener("click", () => {{ save({{}}); restore(); }});
restore();

// Marks the page once every image has decoded, for people and for headless-browser tests.
const images = Array.from(document.querySelectorAll("table.images img"));
function markLoaded() {{
  const done = images.filter(img => img.complete && img.naturalWidth > 0);
  for (const img of done) img.dataset.loaded = img.naturalWidth + "x" + img.naturalHeight;
  document.body.dataset.imagesLoaded = done.length + "/" + images.length;
  if (done.length === images.length) document.body.dataset.allImagesLoaded = "true";
}}
for (const img of images) img.addEventListener("load", markLoaded);
markLoaded();

// #selftest: rate the first pair, export, and record the result (used by the tests).
if (location.hash === "#selftest") {{
  const first = pairs()[0];
  if (first) {{
    const input = first.querySelector("input[value='" + first.dataset.b + "']");
    input.checked = true;
    input.dispatchEvent(new Event("change", {{ bubbles: true }}));
    const exported = JSON.parse(exportRatings());
    document.body.dataset.selftest = exported.ratings.length === 1 && exported.ratings[0].choice === first.dataset.b
      && load()[keyOf(first)] === first.dataset.b ? "ok" : "failed";
  }}
}}
</script>
</body>
</html>
"##,
        version = escape(&meta.version),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_in_prompts() {
        assert_eq!(escape("<b>\"a\" & 'b'</b>"), "&lt;b&gt;&quot;a&quot; &amp; &#39;b&#39;&lt;/b&gt;");
    }

    #[test]
    fn embedded_json_cannot_end_or_hide_the_script() {
        let json = serde_json::to_string("<!--<script> </script> & co").unwrap();
        let safe = script_json(&json);
        assert!(!safe.contains('<') && !safe.contains('>') && !safe.contains('&'), "{safe}");
        assert_eq!(serde_json::from_str::<String>(&safe).unwrap(), "<!--<script> </script> & co");
    }
}
