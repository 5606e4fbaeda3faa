# forge and flash, with their man pages and shell completions.
{
  lib,
  rustPlatform,
  installShellFiles,
  stdenv,
}:
let
  workspace = (lib.importTOML ../Cargo.toml).workspace.package;
in
rustPlatform.buildRustPackage {
  pname = "nixforge";
  inherit (workspace) version;
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../formats
      ../forge
      ../flash
      ../tests
    ];
  };
  cargoLock.lockFile = ../Cargo.lock;
  cargoBuildFlags = [
    "--package"
    "nixforge"
    "--package"
    "nixforge-flash"
  ];
  # The tests need root, loop devices, QEMU and fixture stores: `make test`.
  doCheck = false;
  nativeBuildInputs = [ installShellFiles ];
  postInstall = lib.optionalString (stdenv.buildPlatform.canExecute stdenv.hostPlatform) ''
    for b in forge flash; do
      installShellCompletion --cmd $b \
        --bash <($out/bin/$b completions bash) \
        --zsh <($out/bin/$b completions zsh) \
        --fish <($out/bin/$b completions fish)
      $out/bin/$b man man
    done
    installManPage man/*.1
  '';
  meta = {
    description = "Nix closures to bootable disk images, VM disks and containers; safe flashing";
    license = with lib.licenses; [
      mit
      asl20
    ];
    mainProgram = "forge";
    platforms = lib.platforms.linux;
  };
}
