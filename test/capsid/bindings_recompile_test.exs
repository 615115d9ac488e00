defmodule Capsid.BindingsRecompileTest do
  # Not async: it loads and purges the modules of another Mix project.
  use ExUnit.Case, async: false

  import Capsid.TestHelpers, only: [purge: 1]

  import Capsid.AdoptionHelpers, only: [tmp_dir!: 1]

  @root CapsidBindingsRecompile.Plugin

  test "a changed component file recompiles the module" do
    dir = tmp_dir!("bindings")
    wasm = Path.join(dir, "plugin.wasm")
    File.mkdir_p!(Path.join(dir, "lib"))

    File.write!(Path.join(dir, "mix.exs"), """
    defmodule CapsidBindingsRecompile.MixProject do
      use Mix.Project
      def project, do: [app: :capsid_bindings_recompile, version: "0.1.0"]
    end
    """)

    # Capsid as this test has it compiled (a path dependency would build
    # its NIF again), put on the code path where Mix 1.15+ does not prune it.
    File.write!(Path.join(dir, "lib/plugin.ex"), """
    Code.prepend_path(System.fetch_env!("CAPSID_EBIN"))

    defmodule #{inspect(@root)} do
      use Capsid.Bindings, component: #{inspect(wasm)}
    end
    """)

    # A separate `mix compile`, as a user's project runs it.
    ebin = Application.app_dir(:capsid, "ebin")

    compile = fn ->
      {out, status} =
        System.cmd("mix", ["compile"],
          cd: dir,
          env: [{"CAPSID_EBIN", ebin}, {"MIX_ENV", "dev"}, {"MIX_BUILD_ROOT", nil}],
          stderr_to_stdout: true
        )

      assert status == 0, out
      Code.prepend_path(Path.join(dir, "_build/dev/lib/capsid_bindings_recompile/ebin"))

      purge([@root, Module.concat(@root, Greet), Module.concat(@root, State)])
    end

    File.cp!(Capsid.Guests.path(:greeter_v1), wasm)
    compile.()
    assert Code.ensure_loaded?(Module.concat(@root, Greet))
    assert function_exported?(Module.concat(@root, Greet), :hello, 2)

    # Another component in the same file, with a newer time stamp.
    File.cp!(Capsid.Guests.path(:stateful), wasm)
    File.touch!(wasm, System.os_time(:second) + 5)
    compile.()
    refute Code.ensure_loaded?(Module.concat(@root, Greet))
    assert Code.ensure_loaded?(Module.concat(@root, State))
    assert function_exported?(Module.concat(@root, State), :bump, 1)
  after
    purge([@root, Module.concat(@root, Greet), Module.concat(@root, State)])
  end
end
