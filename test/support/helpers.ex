defmodule Capsid.TestHelpers do
  @moduledoc false
  import ExUnit.Callbacks, only: [start_supervised!: 1]

  def toolkit, do: Capsid.Component.load!(Capsid.Guests.path(:toolkit))

  def toolkit_imports(test_pid \\ self(), config \\ %{}) do
    %{
      "log" => fn level, msg -> send(test_pid, {:guest_log, level, msg}) end,
      "get-config" => fn key -> Map.get(config, key) end
    }
  end

  @doc """
  Starts a supervised instance of `component` with a `hook` import (the
  faulty guest's; `opts[:hook]`, by default the identity); returns its pid.
  """
  def start_instance(component, opts \\ []) do
    {hook, opts} = Keyword.pop(opts, :hook, & &1)
    opts = Keyword.merge([component: component, imports: %{"hook" => hook}], opts)
    start_supervised!(Supervisor.child_spec({Capsid.Instance, opts}, id: make_ref()))
  end

  @doc """
  Polls `fun` every millisecond until it is truthy, for at most `ms`
  (generous by default: CI machines are shared and noisy).
  """
  def wait_until(fun, ms \\ 20_000) do
    deadline = System.monotonic_time(:millisecond) + ms
    do_wait(fun, deadline)
  end

  defp do_wait(fun, deadline) do
    cond do
      fun.() ->
        :ok

      System.monotonic_time(:millisecond) > deadline ->
        ExUnit.Assertions.flunk("condition never became true")

      true ->
        Process.sleep(1) && do_wait(fun, deadline)
    end
  end

  @doc """
  Runs `step` in a linked background process, every `every` ms (0: as fast
  as it can), threading `acc` through it, until stopped. Returns a function
  that stops the process and returns the final `acc`.
  """
  def in_background(acc, every, step) do
    parent = self()
    ref = make_ref()

    pid =
      spawn_link(fn ->
        loop = fn loop, acc ->
          receive do
            :stop -> send(parent, {ref, acc})
          after
            every -> loop.(loop, step.(acc))
          end
        end

        loop.(loop, acc)
      end)

    fn ->
      send(pid, :stop)

      receive do
        {^ref, acc} -> acc
      after
        5_000 -> ExUnit.Assertions.flunk("a background process stopped answering")
      end
    end
  end

  @doc "Starts a supervised toolkit instance; returns its pid."
  def start_toolkit(opts \\ []) do
    opts = Keyword.merge([component: toolkit(), imports: toolkit_imports()], opts)
    start_supervised!(Supervisor.child_spec({Capsid.Instance, opts}, id: make_ref()))
  end

  @doc """
  Compiles `defmodule root do use Capsid.Bindings, component: wasm end` to
  `dir` as a project would: `{:ok, modules, wasm}` or `{:error, text}`.
  """
  def compile_bindings(wasm, root, dir) do
    # `mix test` may still be loading test files (docs and debug info off)
    # while async tests run: on, as in a project's own compile (the types
    # are read from the debug info).
    Code.put_compiler_option(:docs, true)
    Code.put_compiler_option(:debug_info, true)

    File.write!(Path.join(dir, "bind.ex"), """
    defmodule #{inspect(root)} do
      use Capsid.Bindings, component: #{inspect(wasm)}
    end
    """)

    case Kernel.ParallelCompiler.compile_to_path([Path.join(dir, "bind.ex")], dir,
           return_diagnostics: true
         ) do
      {:ok, mods, _} -> {:ok, Enum.sort(mods), wasm}
      {:error, errors, _} -> {:error, Enum.map_join(errors, "\n", &inspect/1)}
    end
  end

  @doc "Unloads modules a test compiled, so that they are gone again afterwards."
  def purge(modules) do
    for m <- modules do
      :code.purge(m)
      :code.delete(m)
    end
  end
end
