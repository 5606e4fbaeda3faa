# nixforge's NixOS module: the machine's own configuration describes the
# disk forge writes, so the image is the system itself (its fileSystems
# and boot loader are the host's, not a generator's private copy), and
#
#   nixos-rebuild build-image --image-variant forge-raw-efi
#
# builds it from the configuration without changing its toplevel.
#
# Rebuilding in place (nixos-rebuild switch, system.autoUpgrade) needs a
# writable root: rootMode = "rw". A read-only root is upgraded by a new
# image: a reflash, `forge vm --upgrade`, which keeps /var, or, with
# `updates.enable`, systemd-sysupdate installing `forge update`'s
# artefacts into the second of two root slots.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.nixforge;
  inherit (lib) mkOption mkIf mkMerge mkDefault types;
  ro = cfg.rootMode == "ro";
  byLabel = label: "/dev/disk/by-label/${label}";
  # This version's A/B slot (forge image --slots 2 names it so).
  version = config.system.image.version;
  slotDevice = "/dev/disk/by-partlabel/nixos_${toString version}";
  up = cfg.updates;
  # What `forge update --source URL` writes into sysupdate.d/, as
  # systemd.sysupdate.transfers (nixpkgs renders lists space-separated).
  source =
    if lib.hasPrefix "http://" up.url || lib.hasPrefix "https://" up.url then
      {
        Type = "url-file";
        Path = lib.removeSuffix "/" up.url;
      }
    else
      {
        Type = "regular-file";
        Path = up.url;
      };
  head = {
    ProtectVersion = "%A";
    Verify = if up.keyring != null then "yes" else "no";
  };
  # A version's partition artefact of `type`; with verity its name
  # carries the partition's GUID (`_@u`), which the root hash decides.
  partition = suffix: type: {
    Transfer = head;
    Source = source // {
      MatchPattern = "nixos_@v${lib.optionalString cfg.verity "_@u"}.${suffix}${lib.optionalString (up.compression != "none") ".${up.compression}"}";
    };
    Target = {
      Type = "partition";
      Path = "auto";
      MatchPattern = "nixos_@v";
      MatchPartitionType = type;
      ReadOnly = "1";
      InstancesMax = "2";
    };
  };
  transfers = {
    "50-nixos-root" = partition "root.raw" "root";
  } // lib.optionalAttrs cfg.verity {
    "51-nixos-verity" = partition "verity.raw" "root-verity";
  } // bootTransfers;
  # The files booting a version (`forge update` publishes them, as
  # image::slots::BootFile names them): its UKI, or a type 1 entry and
  # the kernel and initrd it names; the entry with three boot tries.
  bootFile =
    {
      dir,
      suffix,
      counted,
    }:
    {
      Transfer = head;
      Source = source // {
        MatchPattern = "nixos_@v${suffix}";
      };
      Target = {
        Type = "regular-file";
        Path = dir;
        PathRelativeTo = "boot";
        MatchPattern =
          if counted then
            [
              "nixos_@v+@l-@d${suffix}"
              "nixos_@v+@l${suffix}"
              "nixos_@v${suffix}"
            ]
          else
            "nixos_@v${suffix}";
        Mode = "0444";
        InstancesMax = "2";
      } // lib.optionalAttrs counted {
        TriesLeft = "3";
        TriesDone = "0";
      };
    };
  bootTransfers =
    if up.bootEntry == "uki" then
      {
        "60-nixos-uki" = bootFile {
          dir = "/EFI/Linux";
          suffix = ".efi";
          counted = true;
        };
      }
    else
      {
        "60-nixos-linux" = bootFile {
          dir = "/EFI/nixos";
          suffix = ".linux";
          counted = false;
        };
        "62-nixos-entry" = bootFile {
          dir = "/loader/entries";
          suffix = ".conf";
          counted = true;
        };
      }
      // lib.optionalAttrs config.boot.initrd.enable {
        "61-nixos-initrd" = bootFile {
          dir = "/EFI/nixos";
          suffix = ".initrd";
          counted = false;
        };
      }
      # systemd-boot's bootspec extension names a devicetree exactly then.
      // lib.optionalAttrs config.boot.loader.systemd-boot.installDeviceTree {
        "61-nixos-devicetree" = bootFile {
          dir = "/EFI/nixos";
          suffix = ".dtb";
          counted = false;
        };
      };
  # The live system the forge-iso variant boots (nixforge.live), as
  # nixpkgs' own ISO does with its squashfs: the ISO 9660 volume by its
  # label (a CD, or a USB stick the ISO was written to, whole), the root
  # filesystem image in it loop-mounted read-only, its store under a
  # tmpfs overlay, everything else in memory. Its values override the
  # disk's fileSystems whole, at nixpkgs' image-media priority.
  live = cfg.live;
  isoLabel = "NIXOS_ISO";
  sysroot = lib.optionalString config.boot.initrd.systemd.enable "/sysroot";
  liveFileSystems = {
    "/" = {
      device = "none";
      fsType = "tmpfs";
      options = [ "mode=0755" ];
    };
    "/iso" = {
      device = byLabel isoLabel;
      fsType = "iso9660";
      options = [ "ro" ];
      neededForBoot = true;
    };
    "/nix/.ro-root" = {
      device = "${sysroot}/iso/root.img";
      fsType = "erofs";
      options = [
        "loop"
        "ro"
      ];
      depends = [ "/iso" ];
      neededForBoot = true;
    };
    "/nix/.rw-store" = {
      device = "none";
      fsType = "tmpfs";
      options = [ "mode=0755" ];
      neededForBoot = true;
    };
    "/nix/store".overlay = {
      lowerdir = [ "/nix/.ro-root/nix/store" ];
      upperdir = "/nix/.rw-store/store";
      workdir = "/nix/.rw-store/work";
    };
  };
  # The identity lives on a disk's state partition; a live system has none.
  identity = cfg.identity && !live;
  mkImage = (import ./lib.nix).mkImage;
  # An image variant: only system.build.image and the file's name, so the
  # variant's toplevel is the system's own; the ISO's (`live`) also sets
  # nixforge.live, so its toplevel is the live system's.
  variant =
    {
      format,
      extension,
      extraArgs ? [ ],
      live ? false,
    }:
    { config, ... }:
    {
      image.extension = extension;
      system.build.image = mkImage {
        inherit pkgs format;
        inherit (cfg) firmware;
        # The ISO's root image is read-only and EROFS, whatever the disk's.
        rootMode = if live then "ro" else cfg.rootMode;
        forge = cfg.package;
        toplevel = config.system.build.toplevel;
        name = config.image.baseName;
        fileName = config.image.filePath;
        extraArgs = lib.optionals (!cfg.state && !live) [
          "--state-size"
          "none"
        ] ++ lib.optionals (cfg.rootFs != "ext4" || live) [
          "--root-fs"
          (if live then "erofs" else cfg.rootFs)
        ] ++ lib.optionals cfg.verity [
          "--verity"
        ] ++ lib.optionals up.enable [
          "--slots"
          "2"
        ] ++ lib.optionals (up.enable && up.bootEntry == "uki") [
          "--uki"
        ] ++ lib.optionals up.enable [
          "--version"
          (toString version)
        ] ++ extraArgs ++ cfg.extraArgs;
      };
    }
    // lib.optionalAttrs live { nixforge.live = true; };
in
{
  options.nixforge = {
    enable = mkOption {
      type = types.bool;
      default = false;
      description = "Describe the disk forge writes in this system's own configuration, and add forge's image variants.";
    };
    layout = mkOption {
      type = types.enum [
        "raw-efi"
        "sd-aarch64"
      ];
      default = "raw-efi";
      description = ''
        raw-efi: GPT, an ESP with systemd-boot at /boot, root, state at /var
        (image variants forge-raw-efi, forge-qcow2, forge-vhd, forge-vhdx,
        forge-vmdk, forge-ova, forge-gce).
        sd-aarch64: MBR, the Pi's FAT firmware partition at /boot/firmware,
        root with extlinux, state at /var (image variant forge-sd-aarch64).
      '';
    };
    rootMode = mkOption {
      type = types.enum [
        "ro"
        "rw"
      ];
      default = "ro";
      description = ''
        ro: the root is mounted read-only and the machine is upgraded by a new
        image (/var is kept). rw: a journaled, writable root that
        nixos-rebuild switch and system.autoUpgrade change in place.
      '';
    };
    rootFs = mkOption {
      type = types.enum [
        "ext4"
        "erofs"
      ];
      default = "ext4";
      description = ''
        The root filesystem forge writes: ext4, or erofs (read-only only,
        as large as its content; the kernel needs EROFS, NixOS's has it).
      '';
    };
    verity = mkOption {
      type = types.bool;
      default = false;
      description = ''
        A dm-verity root (forge image --verity): the kernel checks every
        block read from the root against the hash tree in the root-verity
        partition. The boot entry carries `roothash=`; systemd's veritysetup
        generator in the initrd (systemd in the initrd is then required)
        opens the partitions whose GUIDs are the hash's halves as
        /dev/mapper/root, which is mounted at /. With updates, each version
        brings its hash partition and finds its own slot by its hash.
      '';
    };
    live = mkOption {
      type = types.bool;
      default = false;
      description = ''
        The system as the forge-iso variant boots it (that variant sets
        this): a live system whose root is memory, its store the ISO's
        read-only root image under an overlay, and its Nix database copied
        from that image at boot. Not for disk images.
      '';
    };
    state = mkOption {
      type = types.bool;
      default = true;
      description = "A state partition (label `state`) in the image, mounted at /var; false for a VM base (forge vm gives each VM its /var disk, also labelled `state`).";
    };
    identity = mkOption {
      type = types.bool;
      default = cfg.rootMode == "ro" && (cfg.state || cfg.identityDisk);
      defaultText = lib.literalExpression ''config.nixforge.rootMode == "ro" && (config.nixforge.state || config.nixforge.identityDisk)'';
      description = ''
        Take the machine's identity from /var/identity (written by
        `flash --identity` or `forge vm`): machine-id, hostname (when
        networking.hostName is empty) and the SSH host key. On a read-only
        root this also moves /etc to an immutable overlay and users to
        userborn, since activation cannot write /etc there.
      '';
    };
    identityDisk = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Mount the identity disk `forge vm` makes (ext4 labelled `identity`)
        read-only at /var/identity, for VMs made by `forge vm`.
      '';
    };
    firmware = mkOption {
      type = types.listOf (types.either types.path types.str);
      default = [ ];
      description = "sd-aarch64: files for the firmware partition (the Pi's firmware, U-Boot, a kernel= file that config.txt names); \"NAME=FILE\" puts FILE there as NAME (e.g. \"u-boot-rpi3.bin=\${pkgs.ubootRaspberryPi3_64bit}/u-boot.bin\").";
    };
    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [
        "--disk-size"
        "8G"
      ];
      description = "More `forge image` options for every image variant.";
    };
    updates = {
      enable = mkOption {
        type = types.bool;
        default = false;
        description = ''
          A/B updates: the image gets two root slots and a boot entry per
          version (forge image --slots 2 --uki --version
          system.image.version; see bootEntry; --verity with
          nixforge.verity), and
          systemd-sysupdate installs the versions `forge update` publishes
          at `url` into the other slot, with boot counting (three tries,
          then systemd-boot falls back). It runs only once the running
          version is marked good, so the last good one is never replaced.
        '';
      };
      url = mkOption {
        type = types.str;
        default = "";
        example = "https://updates.example.com/nixos";
        description = "Where `forge update` artefacts are published: an http(s) URL or a local directory.";
      };
      compression = mkOption {
        type = types.enum [
          "none"
          "xz"
        ];
        default = "none";
        description = "How the published root artefacts are compressed (`forge update --compress xz`): the transfers match those names.";
      };
      bootEntry = mkOption {
        type = types.enum [
          "uki"
          "type1"
        ];
        default = "uki";
        description = ''
          What boots each version: a Unified Kernel Image (`--uki`, which
          Secure Boot and a verity root's signed command line need), or a
          Boot Loader Specification type 1 entry naming the version's kernel,
          initrd and devicetree (for systemd packages without the EFI stub).
        '';
      };
      keyring = mkOption {
        type = types.nullOr types.path;
        default = null;
        example = lib.literalExpression "./import-pubring.gpg";
        description = ''
          The OpenPGP public key `forge update --sign KEY` writes beside
          the artefacts (`import-pubring.gpg`): installed as
          /etc/systemd/import-pubring.gpg, and the transfers then verify
          each SHA256SUMS against its SHA256SUMS.gpg (Verify=yes), so the
          machine installs only versions signed with that key.
        '';
      };
    };
    package = mkOption {
      type = types.package;
      default = pkgs.buildPackages.callPackage ./package.nix { };
      defaultText = lib.literalExpression "pkgs.buildPackages.callPackage ./package.nix { }";
      description = "forge, as it runs on the build machine.";
    };
  };

  config = mkIf cfg.enable (mkMerge [
    {
      fileSystems."/" = {
        # systemd-veritysetup-generator names the volume of roothash= `root`.
        device =
          if cfg.verity then
            "/dev/mapper/root"
          else if up.enable then
            slotDevice
          else
            byLabel "nixos";
        fsType = cfg.rootFs;
        options = if ro then [ "ro" ] else [ "defaults" ];
      };
      boot.loader.grub.enable = false;
      assertions = [
        {
          assertion = cfg.layout != "sd-aarch64" || cfg.firmware != [ ];
          message = "nixforge.layout = \"sd-aarch64\" needs nixforge.firmware: the Pi's firmware files, U-Boot, and the kernel= file config.txt names.";
        }
        {
          assertion = cfg.rootFs != "erofs" || ro;
          message = "nixforge.rootFs = \"erofs\" is read-only: it needs nixforge.rootMode = \"ro\".";
        }
        {
          assertion = !up.enable || (cfg.layout == "raw-efi" && ro && version != null && up.url != "");
          message = "nixforge.updates needs layout \"raw-efi\", rootMode \"ro\", system.image.version (each version's slot is named for it) and nixforge.updates.url.";
        }
        {
          assertion = !cfg.verity || ro;
          message = "nixforge.verity checks a read-only root: it needs nixforge.rootMode = \"ro\".";
        }
        {
          assertion = !live || (cfg.layout == "raw-efi" && !up.enable && !cfg.verity);
          message = "nixforge.live (the forge-iso variant) boots a raw-efi system from the ISO's root image: nixforge.updates and nixforge.verity are for disk images.";
        }
      ];
    }
    (mkIf live {
      fileSystems = lib.mkOverride 60 liveFileSystems;
      boot.initrd.kernelModules = [
        "loop"
        "overlay"
      ];
      boot.initrd.availableKernelModules = [
        "iso9660"
        "erofs"
      ];
      # forge's root image holds the store's Nix database; a live
      # system's /nix/var is memory: copy it there before Nix starts.
      systemd.services.nixforge-live-db = {
        description = "The live system's Nix database, from the ISO's root image";
        wantedBy = [ "sysinit.target" ];
        before = [
          "sysinit.target"
          "shutdown.target"
          "nix-daemon.socket"
          "nix-daemon.service"
        ];
        conflicts = [ "shutdown.target" ];
        unitConfig = {
          DefaultDependencies = false;
          ConditionPathExists = "!/nix/var/nix/db/db.sqlite";
          RequiresMountsFor = [
            "/nix/.ro-root"
            "/nix/var"
          ];
        };
        serviceConfig.Type = "oneshot";
        script = ''
          mkdir -p /nix/var/nix
          cp -a /nix/.ro-root/nix/var/nix/db /nix/var/nix/
        '';
      };
    })
    (mkIf cfg.verity {
      boot.initrd.systemd.enable = true;
      boot.initrd.systemd.dmVerity.enable = true;
    })
    # A VM's /var disk (forge vm) is labelled `state` too.
    (mkIf (cfg.state || cfg.identityDisk) {
      fileSystems."/var" = {
        device = byLabel "state";
        fsType = "ext4";
        neededForBoot = true;
      };
    })
    (mkIf (cfg.layout == "raw-efi") {
      fileSystems."/boot" = {
        device = byLabel "ESP";
        fsType = "vfat";
        options = [
          "fmask=0077"
          "dmask=0077"
        ];
      };
      boot.loader.systemd-boot.enable = true;
      # An image is written for any machine: its NVRAM is not ours to change.
      boot.loader.efi.canTouchEfiVariables = false;
      image.modules = {
        forge-raw-efi = variant {
          format = "raw-efi";
          extension = "img";
        };
        forge-qcow2 = variant {
          format = "raw-efi";
          extension = "qcow2";
        };
        forge-vhd = variant {
          format = "raw-efi";
          extension = "vhd";
          extraArgs = [
            "--vhd-type"
            "dynamic"
          ];
        };
        forge-vhdx = variant {
          format = "raw-efi";
          extension = "vhdx";
        };
        forge-vmdk = variant {
          format = "raw-efi";
          extension = "vmdk";
        };
        forge-ova = variant {
          format = "raw-efi";
          extension = "ova";
        };
        forge-gce = variant {
          format = "raw-efi";
          extension = "tar.gz";
        };
        forge-iso = variant {
          format = "iso";
          extension = "iso";
          live = true;
        };
      };
    })
    (mkIf (cfg.layout == "sd-aarch64") {
      fileSystems."/boot/firmware" = {
        device = byLabel "FIRMWARE";
        fsType = "vfat";
        options = [
          "nofail"
          "noauto"
        ];
      };
      boot.loader.generic-extlinux-compatible.enable = true;
      image.modules.forge-sd-aarch64 = variant {
        format = "sd-aarch64";
        extension = "img.zst";
      };
    })
    (mkIf up.enable {
      systemd.sysupdate = {
        enable = true;
        inherit transfers;
      };
      environment.etc."systemd/import-pubring.gpg" = mkIf (up.keyring != null) {
        source = up.keyring;
      };
      # sysupdate alone would replace the last good version while the
      # running one is still on trial (systemd#34827): update only after
      # the boot is marked good, or was never counted.
      systemd.services.systemd-sysupdate = {
        after = [
          "boot-complete.target"
          "systemd-bless-boot.service"
        ];
        requires = [ "boot-complete.target" ];
        serviceConfig.ExecCondition = "${pkgs.runtimeShell} -c 'case $(${config.systemd.package}/lib/systemd/systemd-bless-boot status) in good|clean) exit 0 ;; esac; exit 1'";
      };
    })
    (mkIf identity {
      environment.etc."machine-id" = {
        source = "/var/identity/machine-id";
        mode = "direct-symlink";
      };
      networking.hostName = mkDefault "";
      environment.etc.hostname = mkIf (config.networking.hostName == "") {
        source = "/var/identity/hostname";
        mode = "direct-symlink";
      };
      services.openssh.hostKeys = mkDefault [
        {
          path = "/var/identity/ssh_host_ed25519_key";
          type = "ed25519";
        }
      ];
    })
    (mkIf cfg.identityDisk {
      fileSystems."/var/identity" = {
        device = byLabel "identity";
        fsType = "ext4";
        options = [
          "ro"
          "nofail"
        ];
        neededForBoot = true;
      };
    })
    (mkIf (identity && ro) {
      boot.initrd.systemd.enable = mkDefault true;
      system.etc.overlay.enable = mkDefault true;
      system.etc.overlay.mutable = mkDefault false;
      services.userborn.enable = mkDefault true;
      users.mutableUsers = mkDefault false;
    })
  ]);
}
