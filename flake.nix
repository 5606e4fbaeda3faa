{
  description = "nixforge: Nix closures to bootable disk images, VM disks and containers, and safe flashing";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.05";

  outputs =
    { self, nixpkgs }:
    let
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      # forge and flash, with man pages and bash/zsh/fish completions.
      packages = forAllSystems (pkgs: {
        default = pkgs.callPackage ./nix/package.nix { };
      });

      overlays.default = final: _prev: {
        nixforge = final.callPackage ./nix/package.nix { };
      };

      # lib.mkImage { pkgs; nixosConfiguration; format; fileName; rootMode; … }:
      # an ordinary derivation that runs forge on the system's closure.
      lib.mkImage =
        args:
        (import ./nix/lib.nix).mkImage (
          {
            forge = self.packages.${args.pkgs.stdenv.buildPlatform.system}.default;
          }
          // args
        );

      # lib.mkOci { pkgs; path; extraArgs = [ "--entrypoint" … ]; }:
      # result/image.tar, an OCI image of any store path's closure.
      lib.mkOci =
        args:
        (import ./nix/lib.nix).mkOci (
          {
            forge = self.packages.${args.pkgs.stdenv.buildPlatform.system}.default;
          }
          // args
        );

      # nixforge.enable = true: fileSystems, boot loader and identity as
      # forge lays the disk out, and image variants for
      # `nixos-rebuild build-image --image-variant forge-raw-efi`.
      nixosModules.default = ./nix/module.nix;

      formatter = forAllSystems (pkgs: pkgs.nixfmt-rfc-style);
    };
}
