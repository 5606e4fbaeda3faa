# Evaluates nix/module.nix without nixpkgs: a stub `lib` whose mkIf,
# mkMerge, mkDefault and mkOverride leave markers that `resolve` and
# `merge` below apply (priorities as the module system has them), and a
# stub `config` holding the module's own option defaults overridden by
# `settings`. The result is the configuration the module sets, as JSON:
# mkDefault values appear as { default = …; }, each image variant as the
# options it sets with its derivation's builder, system and args.
#
#   nix-instantiate --eval --strict --json tests/nix/eval-module.nix \
#     --arg settings '{ enable = true; layout = "raw-efi"; }'
{
  settings,
  hostName ? "",
  imageVersion ? null,
  systemdInitrd ? false,
  deviceTree ? false,
}:
let
  lib = {
    mkOption = o: o // { _isOption = true; };
    types = {
      bool = "bool";
      str = "str";
      path = "path";
      package = "package";
      enum = values: { inherit values; };
      listOf = t: { listOf = t; };
      either = a: b: { either = [ a b ]; };
      nullOr = t: { nullOr = t; };
    };
    mkIf = condition: content: {
      _type = "if";
      inherit condition content;
    };
    mkMerge = contents: {
      _type = "merge";
      inherit contents;
    };
    mkDefault = content: {
      _type = "override";
      priority = 1000;
      inherit content;
    };
    mkOverride = priority: content: {
      _type = "override";
      inherit priority content;
    };
    optionals = c: l: if c then l else [ ];
    optionalString = c: s: if c then s else "";
    optionalAttrs = c: a: if c then a else { };
    hasPrefix = p: s: builtins.substring 0 (builtins.stringLength p) s == p;
    removeSuffix =
      x: s:
      let
        n = builtins.stringLength s - builtins.stringLength x;
      in
      if n >= 0 && builtins.substring n (builtins.stringLength x) s == x then builtins.substring 0 n s else s;
    literalExpression = t: t;
  };
  pkgs = {
    stdenv.buildPlatform.system = "x86_64-linux";
    runtimeShell = "/nix/store/33333333333333333333333333333333-bash/bin/bash";
  };
  toplevel = "/nix/store/00000000000000000000000000000000-nixos-system-stub";
  module = import ../../nix/module.nix;
  evaluated = module {
    inherit lib pkgs config;
  };
  # Option defaults, through option groups (nixforge.updates.*).
  defaultsOf = builtins.mapAttrs (_: o: if o ? _isOption then o.default else defaultsOf o);
  defaults = defaultsOf evaluated.options.nixforge;
  # An option group set in `settings` keeps its other options' defaults,
  # as the module system merges them.
  grouped = builtins.mapAttrs (
    k: v: if builtins.isAttrs v && builtins.isAttrs (defaults.${k} or null) then defaults.${k} // v else v
  ) settings;
  config = {
    nixforge = defaults // {
      package = "/nix/store/11111111111111111111111111111111-nixforge";
    } // grouped;
    networking.hostName = hostName;
    system.image.version = imageVersion;
    systemd.package = "/nix/store/22222222222222222222222222222222-systemd";
    boot.initrd.enable = true;
    boot.initrd.systemd.enable = systemdInitrd;
    boot.loader.systemd-boot.installDeviceTree = deviceTree;
  };

  # As the module system merges: of an option's values, those of the
  # highest priority (the lowest number: mkOverride 60 over a plain value,
  # 100, over mkDefault, 1000) are kept; two kept values must not differ,
  # or are attribute sets merged.
  prio = v: if builtins.isAttrs v && v ? _prio then v._prio else 100;
  merge =
    a: b:
    if a == null then
      b
    else if b == null then
      a
    else if prio a != prio b then
      (if prio a < prio b then a else b)
    else if prio a != 100 then
      (if a == b then a else throw "the module sets one option twice at one priority: ${builtins.toJSON a} and ${builtins.toJSON b}")
    else if builtins.isAttrs a && builtins.isAttrs b && !(a ? _type) && !(b ? _type) then
      builtins.zipAttrsWith (
        n: vs: if builtins.length vs == 1 then builtins.head vs else merge (builtins.elemAt vs 0) (builtins.elemAt vs 1)
      ) [ a b ]
    else
      throw "the module defines one option twice: ${builtins.toJSON a} and ${builtins.toJSON b}";
  resolve =
    v:
    if builtins.isAttrs v && v ? _type then
      if v._type == "if" then
        (if v.condition then resolve v.content else null)
      else if v._type == "merge" then
        builtins.foldl' merge null (map resolve v.contents)
      else if v._type == "override" then
        {
          _prio = v.priority;
          _value = resolve v.content;
        }
      else
        throw "unknown marker ${v._type}"
    else if builtins.isAttrs v then
      let
        r = builtins.mapAttrs (_: resolve) v;
      in
      builtins.removeAttrs r (builtins.filter (n: r.${n} == null) (builtins.attrNames r))
    else
      v;

  # An image variant, evaluated as nixpkgs' images.nix would: its own
  # config with the system's toplevel and image.filePath from the
  # extension it sets.
  variant =
    f:
    let
      self = f {
        config = {
          system.build.toplevel = toplevel;
          image.baseName = "nixos-image-stub";
          image.filePath = "nixos-image-stub.${self.image.extension}";
        };
      };
      drv = self.system.build.image;
    in
    self
    // {
      system.build.image = {
        inherit (drv) builder system args name __structuredAttrs;
        exportReferencesGraph = drv.exportReferencesGraph;
      };
    };
  # mkDefault values as { default = …; } in the JSON, others as they are.
  unmark =
    v:
    if prio v == 1000 then
      { default = unmark v._value; }
    else if prio v != 100 then
      unmark v._value
    else if builtins.isAttrs v then
      builtins.mapAttrs (_: unmark) v
    else if builtins.isList v then
      map unmark v
    else
      v;
  resolved = unmark (resolve evaluated.config);
in
if resolved ? image then
  resolved // { image.modules = builtins.mapAttrs (_: variant) resolved.image.modules; }
else
  resolved
