# A forge command as a Nix build, written with builtins only (so it is the
# same derivation with or without nixpkgs): forge is the builder itself,
# with no shell around it, and exportReferencesGraph with __structuredAttrs
# hands it `path`'s closure, with the NAR hashes and sizes Nix recorded, in
# .attrs.json in its build directory (what nixpkgs' closureInfo is made
# from), so no file is read twice and no jq is needed. No KVM, no VM, no
# root, no requiredSystemFeatures. image.nix and oci.nix use it.
{
  # A package or store path holding bin/forge that runs on `system`.
  forge,
  # The machine that runs the build (forge's system, not the path's).
  system,
  name,
  # The store path whose closure forge reads.
  path,
  # forge's arguments; `--closure-info .attrs.json` is theirs to give.
  args,
}:
derivation {
  inherit name system args;
  builder = "${forge}/bin/forge";
  __structuredAttrs = true;
  exportReferencesGraph.closure = [ path ];
  # Cheaper to build than to download.
  preferLocalBuild = true;
  allowSubstitutes = false;
}
