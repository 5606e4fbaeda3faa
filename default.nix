# For users without flakes:
#   nix-build -A nixforge                       forge and flash
#   imports = [ (import ./nixforge {}).module ];  the NixOS module
#   (import ./nixforge {}).mkImage { inherit pkgs; nixosConfiguration = …; }
{
  pkgs ? import <nixpkgs> { },
}:
{
  nixforge = pkgs.callPackage ./nix/package.nix { };
  module = ./nix/module.nix;
  inherit ((import ./nix/lib.nix)) mkImage mkOci;
}
