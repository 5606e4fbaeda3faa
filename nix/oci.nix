# `forge oci` as a Nix build (see build.nix): $out holds the image as an
# archive (skopeo's docker-archive:, podman load) or an OCI layout directory.
{
  # A package or store path holding bin/forge that runs on `system`.
  forge,
  # Any store path: a program, a buildEnv, a NixOS or Home Manager toplevel.
  path,
  # The machine that runs the build.
  system,
  # image.tar (an archive) or any other name (an OCI layout directory).
  fileName ? "image.tar",
  name ? "oci-image",
  # More `forge oci` options: --entrypoint, --env, --port, --add-user, …
  extraArgs ? [ ],
}:
import ./build.nix {
  inherit forge system name path;
  args = [
    "oci"
    "${path}"
    "--closure-info"
    ".attrs.json"
    "--output"
    "${builtins.placeholder "out"}/${fileName}"
  ] ++ extraArgs;
}
