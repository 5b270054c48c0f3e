#!/usr/bin/env bash
# Build a test root for a Stable Diffusion WebUI checkout (AUTOMATIC1111 or its Forge fork), so that the
# WebUI tests (tests/webui/) run the DejaGuard extension inside it:
#
#   bash tests/webui/setup_webui_checkout.sh WEBUI_DIR ROOT
#   DEJAGUARD_WEBUI_ROOT=ROOT .venv/bin/python -m pytest -q tests/webui
#
# ROOT/webui     a copy of WEBUI_DIR, with the repositories its launcher would clone at start-up already in
#                repositories/ (at the commits its modules/launch_utils.py pins), the DejaGuard repository linked
#                as extensions/DejaGuard and the test probe (tests/webui/probe_extension) as extensions/zz-probe
# ROOT/venv      torch 2.14.1 + torchvision 0.29.1 (as the ComfyUI test venvs), the checkout's
#                requirements_versions.txt (setuptools and opencv-python pins that fail on Python 3.11 replaced),
#                openai/CLIP at its pinned commit and diffusers (the extension's checkpoint fingerprint)
# ROOT/hf        a Hugging Face cache with the CLIP-L text config and tokenizer A1111 reads at start-up (the
#                SD1 config and BPE files this repository ships); Forge ships its own
#
# The WebUI is not on a package registry and its launcher clones from GitHub: the sources come from
# DEJAGUARD_WEBUI_GIT, a folder of git mirrors laid out as OWNER+NAME/repo (a bare or normal git directory; a
# fork with the same name and the pinned commit is taken when OWNER+NAME is missing), or, when it is unset,
# from https://github.com/OWNER/NAME.git. Snapshots may lack a few large sample files: those are skipped.
# Idempotent; rerun with a new WEBUI_DIR after deleting ROOT/webui.
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 WEBUI_DIR ROOT" >&2
    exit 2
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SRC="$(cd "$1" && pwd)"
ROOT="$2"
PY="${PYTHON:-python3}"
[ -f "$SRC/launch.py" ] && [ -f "$SRC/modules/launch_utils.py" ] || { echo "$SRC is not a WebUI folder" >&2; exit 1; }
mkdir -p "$ROOT"
ROOT="$(cd "$ROOT" && pwd)"
STAMP="$ROOT/venv/.dejaguard-deps-v1"
source "$REPO/tests/comfy/place_comfy.sh"  # COMFY_TORCH: the one torch pin of the test venvs

# git_dir OWNER NAME COMMIT -> a git directory holding COMMIT (a mirror, or a fresh clone under ROOT/git)
git_dir() {
    local owner="$1" name="$2" commit="$3" dir
    if [ -n "${DEJAGUARD_WEBUI_GIT:-}" ]; then
        for dir in "$DEJAGUARD_WEBUI_GIT/$owner+$name/repo" "$DEJAGUARD_WEBUI_GIT"/*+"$name"/repo; do
            if [ -d "$dir" ] && git --git-dir="$dir" cat-file -e "$commit^{commit}" 2>/dev/null; then
                echo "$dir"
                return
            fi
        done
        echo "no mirror of $owner/$name with commit $commit under $DEJAGUARD_WEBUI_GIT" >&2
        return 1
    fi
    dir="$ROOT/git/$owner+$name"
    [ -d "$dir" ] || git clone --quiet --bare "https://github.com/$owner/$name.git" "$dir" >&2
    echo "$dir"
}

# export_tree GITDIR COMMIT DEST: the files of COMMIT into DEST (no .git), skipping blobs the snapshot lacks
export_tree() {
    local gitdir="$1" commit="$2" dest="$3" index
    index="$(mktemp)"
    rm -rf "$dest.tmp" && mkdir -p "$dest.tmp"
    GIT_INDEX_FILE="$index" git --git-dir="$gitdir" read-tree "$commit"
    GIT_INDEX_FILE="$index" git --git-dir="$gitdir" ls-files -s \
        | awk '{print $2}' | git --git-dir="$gitdir" cat-file --batch-check='%(objectname) %(objecttype)' \
        | paste - <(GIT_INDEX_FILE="$index" git --git-dir="$gitdir" ls-files) \
        | awk -F'\t' '$1 !~ /missing/ {print $2}' \
        | GIT_INDEX_FILE="$index" git --git-dir="$gitdir" --work-tree="$dest.tmp" checkout-index -f --stdin
    rm -f "$index"
    mv "$dest.tmp" "$dest"
}

# The repositories launch_utils.prepare_environment would clone (active git_clone lines only), and CLIP:
# "URL DIRNAME COMMIT" per line.
clones() {
    "$PY" - "$SRC/modules/launch_utils.py" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
live = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
value = dict(re.findall(r"(\w+) = os\.environ\.get\('\w+', ['\"]([^'\"]+)['\"]\)", live))
for repo, folder, commit in re.findall(r"git_clone\((\w+), repo_dir\('([^']+)'\), \"[^\"]*\", (\w+)\)", live):
    print(value[repo], folder, value[commit])
clip = re.search(r"openai/CLIP/archive/(\w+)\.zip", value.get("clip_package", ""))
if clip:
    print("https://github.com/openai/CLIP.git", "-", clip.group(1))
EOF
}

if [ ! -f "$ROOT/webui/launch.py" ]; then
    rm -rf "$ROOT/webui.tmp"
    cp -r "$SRC" "$ROOT/webui.tmp"
    mv "$ROOT/webui.tmp" "$ROOT/webui"
fi
mkdir -p "$ROOT/webui/repositories"
CLIP_SRC=""
while read -r url folder commit; do
    owner_name="${url#https://github.com/}"
    owner_name="${owner_name%.git}"
    gitdir="$(git_dir "${owner_name%%/*}" "${owner_name##*/}" "$commit")"
    if [ "$folder" = "-" ]; then
        CLIP_SRC="$ROOT/clip-src"
        [ -d "$CLIP_SRC" ] || export_tree "$gitdir" "$commit" "$CLIP_SRC"
    elif [ ! -d "$ROOT/webui/repositories/$folder" ]; then
        export_tree "$gitdir" "$commit" "$ROOT/webui/repositories/$folder"
    fi
done < <(clones)

[ -x "$ROOT/venv/bin/python" ] || "$PY" -m venv "$ROOT/venv"
PIP=("$ROOT/venv/bin/python" -m pip install --no-input --progress-bar off)
if [ ! -f "$STAMP" ]; then
    "${PIP[@]}" "${COMFY_TORCH[@]}"
    sed -E -e 's/^setuptools==.*/setuptools>=77.0.3,<81/' -e 's/^opencv-python==.*/opencv-python==4.11.0.86/' \
        -e '/^(torch|torchvision)([^a-z_-]|$)/d' "$ROOT/webui/requirements_versions.txt" > "$ROOT/requirements.txt"
    "${PIP[@]}" -r "$ROOT/requirements.txt"
    if [ -n "$CLIP_SRC" ]; then
        "${PIP[@]}" --no-build-isolation "$CLIP_SRC"
    fi
    if ! "$ROOT/venv/bin/python" -c "import diffusers" 2>/dev/null; then  # A1111: a diffusers that leaves its pins
        "$ROOT/venv/bin/python" -m pip freeze --exclude-editable > "$ROOT/installed.txt"
        "${PIP[@]}" -c "$ROOT/installed.txt" "diffusers>=0.27"
    fi
    touch "$STAMP"
fi

# A1111 builds its CLIP-L text encoder from the hub's config and tokenizer files (--do-not-download-clip still
# reads them): this repository's SD1 config (core/configs) and BPE files (the testbed's tokenizer).
SNAP="$ROOT/hf/hub/models--openai--clip-vit-large-patch14/snapshots/dejaguard"
mkdir -p "$SNAP" "$ROOT/hf/hub/models--openai--clip-vit-large-patch14/refs"
cp "$REPO/core/configs/sd1/text_encoder/config.json" "$SNAP/config.json"
cp "$REPO/core/testbed/model/tokenizer/"* "$SNAP/"
echo -n dejaguard > "$ROOT/hf/hub/models--openai--clip-vit-large-patch14/refs/main"

mkdir -p "$ROOT/webui/extensions"
for pair in "DejaGuard:$REPO" "zz-probe:$REPO/tests/webui/probe_extension"; do
    link="$ROOT/webui/extensions/${pair%%:*}"
    if [ "$(readlink "$link" 2>/dev/null || true)" != "${pair#*:}" ]; then
        rm -rf "$link"
        ln -s "${pair#*:}" "$link"
    fi
done
echo "WebUI test root ready: $ROOT (run the tests with DEJAGUARD_WEBUI_ROOT=$ROOT)"
