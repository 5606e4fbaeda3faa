# lib.mkImage: a NixOS system (or any toplevel) to a disk image, as an
# ordinary derivation (see image.nix).
#
#   mkImage {
#     pkgs = nixpkgs.legacyPackages.x86_64-linux;   # the build machine's
#     nixosConfiguration = self.nixosConfigurations.machine;
#     format = "raw-efi";                           # or "sd-aarch64"
#     fileName = "nixos.qcow2";                     # picks the container
#   }
#
# Signed images in two steps (keys never enter the Nix store): build
# unsigned here with `extraArgs = [ "--uki" "--verity" ]` and a raw
# `fileName` (nixos.img), then, where the keys are,
#   forge sign result/nixos.img -o signed.img \
#     --secure-boot-key db.key --secure-boot-cert db.crt \
#     --verity-key verity.key --verity-cert verity.crt
# which gives the bytes `forge image` makes with the keys.
{
  mkImage =
    {
      # The build machine's package set (forge is built from it).
      pkgs,
      nixosConfiguration ? null,
      toplevel ? nixosConfiguration.config.system.build.toplevel,
      format ? "raw-efi",
      fileName ? (if format == "sd-aarch64" then "nixos.img.zst" else "nixos.img"),
      name ? "nixos-image",
      # ro: read-only root, upgraded by a new image; rw: journaled root that
      # nixos-rebuild and system.autoUpgrade can change in place.
      rootMode ? "ro",
      # sd-aarch64: store paths or files for the firmware partition (the
      # Pi's firmware, U-Boot and a kernel= file config.txt names); a
      # "NAME=FILE" string puts FILE there as NAME.
      firmware ? [ ],
      extraArgs ? [ ],
      forge ? pkgs.buildPackages.callPackage ./package.nix { },
    }:
    import ./image.nix {
      inherit forge toplevel format fileName name;
      system = pkgs.stdenv.buildPlatform.system;
      extraArgs =
        [
          "--root-mode"
          rootMode
        ]
        ++ builtins.concatMap (f: [
          "--firmware"
          "${f}"
        ]) firmware
        ++ extraArgs;
    };

  # mkOci { pkgs; path = myEnv; extraArgs = [ "--entrypoint" "${myEnv}/bin/app" ]; }:
  # result/image.tar, for `skopeo copy docker-archive:result/image.tar …`.
  mkOci =
    {
      pkgs,
      path,
      fileName ? "image.tar",
      name ? "oci-image",
      extraArgs ? [ ],
      forge ? pkgs.buildPackages.callPackage ./package.nix { },
    }:
    import ./oci.nix {
      inherit forge path fileName name extraArgs;
      system = pkgs.stdenv.buildPlatform.system;
    };
}
