# `forge image` as a Nix build, written with builtins only: the same
# derivation with or without nixpkgs. lib.mkImage and the module's image
# variants call it; the tests build it here with Debian's nix-bin, whose
# store has no nixpkgs, in the sandbox.
#
# forge is the builder itself, with no shell around it: with
# __structuredAttrs, exportReferencesGraph hands it the closure with the NAR
# hashes and sizes Nix recorded, in .attrs.json in its build directory (what
# nixpkgs' closureInfo is made from), so no file is read twice and no jq is
# needed. No KVM, no VM, no root, no requiredSystemFeatures.
{
  # A package or store path holding bin/forge that runs on `system`.
  forge,
  # The system to put on the disk: config.system.build.toplevel.
  toplevel,
  # The machine that runs the build (forge's system, not the toplevel's).
  system,
  # forge image --format: raw-efi or sd-aarch64.
  format ? "raw-efi",
  # The image inside $out; its extension picks the container: .img, .raw,
  # .img.zst, .qcow2, .vhd. The layout manifest (and a bmap for raw and
  # zstd images) go beside it.
  fileName ? "nixos.img",
  name ? "nixos-image",
  # More `forge image` options; store paths in them become inputs.
  extraArgs ? [ ],
}:
derivation {
  inherit name system;
  builder = "${forge}/bin/forge";
  args = [
    "image"
    "${toplevel}"
    "--format"
    format
    "--closure-info"
    ".attrs.json"
    "--output"
    "${builtins.placeholder "out"}/${fileName}"
  ] ++ extraArgs;
  __structuredAttrs = true;
  exportReferencesGraph.closure = [ toplevel ];
  # Writing the image is cheaper than downloading it.
  preferLocalBuild = true;
  allowSubstitutes = false;
}
