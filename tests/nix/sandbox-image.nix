# forge inside a real Nix build, in the sandbox, without nixpkgs: the
# flake's own lib.mkImage (nix/lib.nix, nix/image.nix) with a forge binary
# imported into the store (static: the sandbox holds only store paths).
{
  forgeDir, # a directory holding bin/forge
  toplevel, # a store path in the store being built into
  format ? "raw-efi",
  fileName ? "nixos.img",
  extraArgs ? [ ],
}:
(import ../../nix/lib.nix).mkImage {
  pkgs.stdenv.buildPlatform.system = builtins.currentSystem;
  forge = builtins.path {
    path = forgeDir;
    name = "forge-static";
  };
  toplevel = builtins.storePath toplevel;
  inherit format fileName extraArgs;
}
