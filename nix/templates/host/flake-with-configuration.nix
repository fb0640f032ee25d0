# The host flake nixos-kexec wrote for this machine: your configuration (the input
# `configuration`) with the modules only the installer could write, under your configuration's
# name. Keep it; change the system with
#   nixos-rebuild switch --flake /etc/nixos#@name@
{
  description = "@hostname@: @user_flake@ with the modules nixos-kexec generated";

  inputs.configuration.url = "@configuration_url@";
  /*@nixpkgs_input@*/

  outputs = { self, configuration, nixpkgs }:
    let
      # The generated modules added to your configuration. Remove a name to leave that part to
      # your own modules (disko declares the filesystems; your own hardware file, the boot
      # loader); an option both set to different values stops the build with
      # "The option `…' has conflicting definition values", naming both files.
      generated = [ /*@generated@*/ ];
      modules = {
        /*@modules@*/
      };
    in
    {
      nixosConfigurations."@name@" = configuration.nixosConfigurations."@name@".extendModules {
        modules = map (part: modules.${part}) generated;
      };
    };
}
