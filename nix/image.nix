# `forge image` as a Nix build (see build.nix): lib.mkImage and the
# module's image variants call it; the tests build it here with Debian's
# nix-bin, whose store has no nixpkgs, in the sandbox.
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
import ./build.nix {
  inherit forge system name;
  path = toplevel;
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
}
