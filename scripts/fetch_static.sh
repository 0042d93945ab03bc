#!/usr/bin/env bash
# Fetch the JavaScript that the book's website serves itself, so every page works offline:
#   MathJax 3 (typesets the maths)  -> book/_static/mathjax/
#   Mermaid   (draws the diagrams)  -> book/_static/mermaid/
# _config.yml points Sphinx at these copies (`html_static_path`, `mathjax_path`,
# scripts/offline_site.py), so no page loads a script, style sheet or font from another host.
#
# Run it once before `jupyter-book build .`; it is idempotent and does nothing when the pinned
# versions are already in place. Needs `npm` (Debian: apt-get install npm), python3 and the
# npm registry, nothing else: `npm pack` downloads each package's tarball alone (no dependency
# tree, no node_modules), we check it against the SHA-512 pinned below and copy out only the
# files a browser loads. book/_static/ is generated and git-ignored.
#
# To upgrade: change a version, run `npm pack --json PACKAGE@VERSION` and paste its
# "integrity" here. Mermaid 11.12.1 is sphinxcontrib-mermaid 2.x's default version.
set -euo pipefail
cd "$(dirname "$0")/.."

MATHJAX_VERSION=3.2.2
MATHJAX_SHA512="sha512-Bt+SSVU8eBG27zChVewOicYs7Xsdt40qm4+UpHyX7k0/O9NliPc+x77k1/FEsPsjKPZGJvtRZM1vO+geW0OhGw=="
MERMAID_VERSION=11.12.1
MERMAID_SHA512="sha512-UlIZrRariB11TY1RtTgUWp65tphtBv4CSq7vyS2ZZ2TgoMjs2nloq+wFqxiwcxlhHUvs7DPGgMjs2aeQxz5h9g=="

STATIC=book/_static

command -v npm >/dev/null || { echo "fetch_static.sh: npm not found (Debian: apt-get install npm)" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# fetch NAME VERSION SHA512: download NAME@VERSION's tarball, verify it, unpack to $tmp/NAME.
fetch() {
    local name=$1 version=$2 want=$3 got tgz
    (cd "$tmp" && npm pack --silent --no-fund --no-audit "$name@$version" >/dev/null)
    tgz="$tmp/$name-$version.tgz"
    got=$(python3 -c 'import base64, hashlib, sys; print("sha512-" + base64.b64encode(hashlib.sha512(open(sys.argv[1], "rb").read()).digest()).decode())' "$tgz")
    if [ "$got" != "$want" ]; then
        echo "fetch_static.sh: $name@$version has integrity $got, expected $want" >&2
        exit 1
    fi
    mkdir -p "$tmp/$name"
    tar -xzf "$tgz" -C "$tmp/$name" --strip-components=1
}

# up_to_date DIR VERSION: true when DIR holds VERSION (written last, after a complete copy).
up_to_date() { [ -f "$1/VERSION" ] && [ "$(cat "$1/VERSION")" = "$2" ]; }

mkdir -p "$STATIC"

# MathJax: the combined TeX + MathML -> CommonHTML component, the woff2 fonts it loads, and
# every component it can load later from its own folder ([mathjax]/...): TeX extensions
# (autoload, \require), the MathML extensions, the context menu, and the accessibility
# tools the menu switches on (a11y, sre with its speech maps). The SVG output is left out.
if up_to_date "$STATIC/mathjax" "$MATHJAX_VERSION"; then
    echo "MathJax $MATHJAX_VERSION already in $STATIC/mathjax"
else
    fetch mathjax "$MATHJAX_VERSION" "$MATHJAX_SHA512"
    rm -rf "$STATIC/mathjax"
    mkdir -p "$STATIC/mathjax/output"
    es5="$tmp/mathjax/es5"
    cp "$es5/tex-mml-chtml.js" "$STATIC/mathjax/"
    cp -r "$es5/input" "$es5/ui" "$es5/a11y" "$es5/sre" "$STATIC/mathjax/"
    cp -r "$es5/output/chtml" "$es5/output/chtml.js" "$STATIC/mathjax/output/"
    cp "$tmp/mathjax/LICENSE" "$STATIC/mathjax/LICENSE"
    echo "$MATHJAX_VERSION" > "$STATIC/mathjax/VERSION"
    echo "MathJax $MATHJAX_VERSION -> $STATIC/mathjax ($(du -sh "$STATIC/mathjax" | cut -f1))"
fi

# Mermaid: the single-file build (a classic script that defines the global `mermaid`, every
# diagram type included). scripts/offline_site.py loads it on pages with a diagram; unlike the
# ES-module build it also works on pages opened from file://.
if up_to_date "$STATIC/mermaid" "$MERMAID_VERSION"; then
    echo "Mermaid $MERMAID_VERSION already in $STATIC/mermaid"
else
    fetch mermaid "$MERMAID_VERSION" "$MERMAID_SHA512"
    rm -rf "$STATIC/mermaid"
    mkdir -p "$STATIC/mermaid"
    cp "$tmp/mermaid/dist/mermaid.min.js" "$STATIC/mermaid/"
    cp "$tmp/mermaid/LICENSE" "$STATIC/mermaid/LICENSE"
    echo "$MERMAID_VERSION" > "$STATIC/mermaid/VERSION"
    echo "Mermaid $MERMAID_VERSION -> $STATIC/mermaid ($(du -sh "$STATIC/mermaid" | cut -f1))"
fi
