# forge oci inside a sandboxed Nix build without nixpkgs: lib.mkOci with a
# static forge imported into the store.
{
  forgeDir,
  path,
  extraArgs ? [ ],
}:
(import ../../nix/lib.nix).mkOci {
  pkgs.stdenv.buildPlatform.system = builtins.currentSystem;
  forge = builtins.path {
    path = forgeDir;
    name = "forge-static";
  };
  path = builtins.storePath path;
  inherit extraArgs;
}
