#!/usr/bin/env bash
# Render every diagram of the documentation from its Mermaid source: docs/diagrams/NAME.mmd ->
# NAME.svg. The SVG files are committed, so building the site needs neither Node.js nor a
# browser; run this after editing a .mmd file and commit both.
#
# Needs Node.js with npm and a Chromium (Debian: apt-get install chromium). Mermaid's CLI is
# installed into a scratch directory, using that Chromium instead of downloading one.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
work="${MMDC_DIR:-${TMPDIR:-/tmp}/writethrough-mmdc}"
chromium="${CHROMIUM:-$(command -v chromium || command -v chromium-browser)}"
mkdir -p "$work"
if [ ! -x "$work/node_modules/.bin/mmdc" ]; then
    (cd "$work" && PUPPETEER_SKIP_DOWNLOAD=1 npm install --silent @mermaid-js/mermaid-cli@11)
fi
cat > "$work/puppeteer.json" <<JSON
{"executablePath": "$chromium", "args": ["--no-sandbox", "--disable-gpu",
 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]}
JSON
for source in "$here"/*.mmd; do
    "$work/node_modules/.bin/mmdc" --quiet -p "$work/puppeteer.json" -c "$here/mermaid.json" \
        -b white -i "$source" -o "${source%.mmd}.svg"
    echo "rendered ${source%.mmd}.svg"
done
