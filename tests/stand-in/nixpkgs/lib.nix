# The stand-in's module system (TEST DOUBLE; see flake.nix). It keeps NixOS's rules for what
# the generated and the users' modules use: modules are paths, functions or attribute sets with
# `imports`; `mkDefault`/`mkForce`/`mkOverride` set a priority, `mkIf` and `mkMerge` are pushed
# down to the options; for each option the definitions of the best priority win, lists are
# concatenated, and different values are a conflict, reported in NixOS's words.
{ self }:
let
  inherit (builtins) all any attrNames concatMap elem filter foldl' head isAttrs isFunction isList isPath isString length map tail toJSON;

  unique = foldl' (acc: x: if elem x acc then acc else acc ++ [ x ]) [ ];

  lib = rec {
    mkOverride = priority: content: { _type = "override"; inherit priority content; };
    mkDefault = mkOverride 1000;
    mkForce = mkOverride 50;
    mkOptionDefault = mkOverride 1500;
    mkIf = condition: content: { _type = "if"; inherit condition content; };
    mkMerge = contents: { _type = "merge"; inherit contents; };
    optional = condition: x: if condition then [ x ] else [ ];
    optionals = condition: xs: if condition then xs else [ ];
    toInt = s: builtins.fromJSON s;
    # What the tests tell two copies apart by (nixpkgs has a lib.version too).
    version = if builtins.pathExists "${self}/.version" then builtins.readFile "${self}/.version" else "stand-in";
    nixosSystem = evalSystem;
  };

  modulesPath = "${self}/nixos/modules";

  # One module as a list of { file, value } (value: its definitions), its imports after it.
  collect = args: module:
    let
      value = if isPath module || isString module then import module else module;
      file = if isPath module || isString module then toString module else "<inline module>";
      called = if isFunction value then value args else value;
      value' =
        if called ? config || called ? options then called.config or { }
        else removeAttrs called [ "imports" "options" "_file" "key" "disabledModules" ];
    in
    [ { inherit file; value = value'; } ] ++ concatMap (collect args) (called.imports or [ ]);

  isOption = v: isAttrs v && (v ? _type || v.type or null == "derivation");
  # Definitions with mkIf/mkMerge/mkOverride taken apart: { file, value, priority }.
  expand = def:
    let v = def.value; kind = if isAttrs v then v._type or null else null;
    in
    if kind == "if" then (if v.condition then expand (def // { value = v.content; }) else [ ])
    else if kind == "merge" then concatMap (c: expand (def // { value = c; })) v.contents
    else if kind == "override" then expand (def // { value = v.content; priority = v.priority; })
    else [ ({ priority = 100; } // def) ];

  show = v: if isString v then ''"${v}"'' else toJSON v;

  merge = path: defs:
    let
      expanded = concatMap expand defs;
      sets = all (d: isAttrs d.value && !(isOption d.value)) expanded;
      names = unique (concatMap (d: attrNames d.value) expanded);
      best = foldl' (p: d: if d.priority < p then d.priority else p) 100000 expanded;
      winners = filter (d: d.priority == best) expanded;
      first = (head winners).value;
      where = builtins.concatStringsSep "." path;
    in
    if expanded != [ ] && sets then
      builtins.listToAttrs (map
        (name: {
          inherit name;
          value = merge (path ++ [ name ])
            (map (d: d // { value = d.value.${name}; }) (filter (d: d.value ? ${name}) expanded));
        })
        names)
    else if all (d: isList d.value) winners then concatMap (d: d.value) winners
    else if all (d: d.value == first) winners then first
    else
      throw ("The option `${where}' has conflicting definition values:"
        + builtins.concatStringsSep "" (map (d: "\n- In `${d.file}': ${show d.value}") winners));

  # The NixOS system: the merged configuration, and a toplevel derivation built from it.
  evalSystem = evalArgs@{ modules, specialArgs ? { }, ... }:
    let
      base = { config, ... }: {
        system.build.toplevel = toplevel config;
      };
      args = { inherit config lib modulesPath; pkgs = { }; options = { }; } // specialArgs;
      config = merge [ ] (concatMap (collect args) (modules ++ [ base ]));
    in
    {
      _type = "configuration";
      inherit config lib;
      options = { };
      pkgs = { };
      extendModules = { modules ? [ ], specialArgs ? { }, ... }:
        evalSystem (evalArgs // {
          modules = evalArgs.modules ++ modules;
          specialArgs = (evalArgs.specialArgs or { }) // specialArgs;
        });
    };

  toplevel = config:
    let
      platform = config.nixpkgs.hostPlatform or (throw
        "Neither nixpkgs.hostPlatform nor nixpkgs.system is set: the generated hardware-configuration.nix sets it, or your own configuration must.");
      name = config.networking.hostName or "nixos";
    in
    derivation {
      name = "nixos-system-${name}-stand-in";
      system = platform;
      # As NixOS's toplevel: never looked up in a binary cache.
      preferLocalBuild = true;
      allowSubstitutes = false;
      builder = "${self}/busybox";
      args = [ "sh" "${self}/build-system.sh" ];
      tools = self;
      # The merged configuration, the evidence the tests read; `system` holds this derivation.
      configuration = toJSON (removeAttrs config [ "system" ]);
      passAsFile = [ "configuration" ];
    };
in
lib
