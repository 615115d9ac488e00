defmodule Capsid.Imports do
  @moduledoc false
  # Imports implemented in Elixir: checking the `imports:` map against what a
  # component imports, and running them for a call (mirrors
  # host_nif/src/imports.rs).
  #
  # An import runs in a runner process that belongs to the calling process:
  # started on first use, killed with the caller (even in the middle of an
  # import), reused by the caller's later imports (a message round trip
  # instead of a spawn), and killed when an import overruns the call's
  # deadline. The runner is not linked to the caller: an import that kills
  # its runner (or a process linked to it that crashes) must end in an
  # `:import_failed` trap, not take the caller down. A guard process linked
  # to the caller, trapping exits, kills the runner when the caller dies.

  alias Capsid.{Component, Native}

  @runner {__MODULE__, :runner}

  @doc false
  # Checks `imports` against `component`; returns the `[{key, fun, inline}]`
  # list the NIF links with (sorted, canonical names, only the imports the
  # component has). A value is a function, `{module, name}`, or either with
  # `inline: boolean` as `{value, inline: boolean}`. A key the component does
  # not import is ignored, unless `strict` (then it is an `ArgumentError`).
  def check!(imports, component, strict \\ false)

  # No imports given: nothing to check or link (an instance start's common
  # case, and the name table below costs ~13 µs for a WASI component).
  def check!(imports, %Component{}, _strict) when imports == %{}, do: []

  def check!(imports, %Component{} = component, strict) when is_map(imports) do
    wanted = component.imports
    by_key = component.import_keys || keys(wanted)

    imports
    |> Enum.flat_map(fn {key, value} ->
      unless is_binary(key) do
        raise ArgumentError, "invalid key in :imports: expected a string, got #{inspect(key)}"
      end

      {fun, inline} = import_value!(key, value)

      case Map.get(by_key, key) do
        nil when strict ->
          raise ArgumentError, unknown_import(key, wanted)

        nil ->
          []

        {:ambiguous, names} ->
          raise ArgumentError,
                "import name #{inspect(key)} is ambiguous: the component imports " <>
                  Enum.map_join(names, " and ", &inspect/1) <> "; use the full name"

        import ->
          fun = function!(key, fun, import)
          [{import.name, fun, inline, heavy?(fun)}]
      end
    end)
    |> Enum.sort_by(&elem(&1, 0))
    |> reject_duplicates!()
  end

  def check!(other, _component, _strict) do
    raise ArgumentError,
          "invalid value for :imports: expected a map of name => function, got #{inspect(other)}"
  end

  @doc false
  # Every import by its name, its version-less qualified name and, when no
  # other non-WASI import has the same one, its short name: one map, so that
  # checking n imports costs n lookups (a component may import tens of
  # thousands of functions). Computed once per component, at load.
  def keys(wanted) do
    full =
      Enum.reduce(wanted, %{}, fn i, acc ->
        acc = Map.put_new(acc, i.name, i)

        if i.interface,
          do: Map.put_new(acc, "#{strip_version(i.interface)}##{i.function}", i),
          else: acc
      end)

    wanted
    |> Enum.filter(&(&1.interface != nil and not wasi?(&1)))
    |> Enum.group_by(& &1.function)
    |> Enum.reduce(full, fn
      {short, _}, acc when is_map_key(acc, short) -> acc
      {short, [one]}, acc -> Map.put(acc, short, one)
      {short, many}, acc -> Map.put(acc, short, {:ambiguous, Enum.map(many, & &1.name)})
    end)
  end

  defp unknown_import(key, wanted) do
    names = wanted |> Enum.reject(&wasi?/1) |> Enum.map(&inspect(&1.name))
    listed = Enum.take(names, 20) |> Enum.join(", ")
    more = if length(names) > 20, do: " and #{length(names) - 20} more", else: ""

    "unknown import #{inspect(key)} in :imports (strict_imports: true); the component imports: " <>
      if(names == [], do: "nothing besides WASI", else: listed <> more)
  end

  # Two keys naming the same import (say its short and its full name).
  defp reject_duplicates!(links) do
    links
    |> Enum.chunk_by(&elem(&1, 0))
    |> Enum.map(fn
      [one] ->
        one

      [{name, _, _, _} | _] ->
        raise ArgumentError, "import #{inspect(name)} is given more than once in :imports"
    end)
  end

  defp function!(key, {mod, name}, import) when is_atom(mod) and is_atom(name) do
    arity = length(import.params)
    Code.ensure_loaded(mod)

    if function_exported?(mod, name, arity) do
      Function.capture(mod, name, arity)
    else
      raise ArgumentError,
            "import #{inspect(key)} takes #{arity} argument(s) " <>
              "(#{Component.signature(import)}), but #{inspect(mod)}.#{name}/#{arity} " <>
              "is not an exported function"
    end
  end

  defp function!(key, fun, import) when is_function(fun) do
    {:arity, arity} = :erlang.fun_info(fun, :arity)

    if arity != length(import.params) do
      raise ArgumentError,
            "import #{inspect(key)} takes #{length(import.params)} argument(s) " <>
              "(#{Component.signature(import)}), but the function given takes #{arity}"
    end

    fun
  end

  defp function!(key, other, _import) do
    raise ArgumentError,
          "invalid value for import #{inspect(key)}: expected a function or " <>
            "{module, function_name}, got #{inspect(other)}"
  end

  defp import_value!(key, {fun, opts}) when is_list(opts) do
    case opts do
      [inline: inline] when is_boolean(inline) ->
        {fun, inline}

      _ ->
        raise ArgumentError,
              "invalid options for import #{inspect(key)}: expected [inline: boolean], " <>
                "got #{inspect(opts)}"
    end
  end

  defp import_value!(_key, fun), do: {fun, false}

  # A function that captures a large environment (a closure over a big
  # list, say) is copied into the calling process at every import; the NIF
  # does that copy on a dirty scheduler for these. Measured once, at start,
  # by a walk that stops as soon as the environment is known to be large.
  @heavy_nodes 20_000

  defp heavy?(fun) do
    {:env, env} = Function.info(fun, :env)
    spend(env, @heavy_nodes) < 0
  end

  defp spend(_term, n) when n < 0, do: n
  defp spend([head | tail], n), do: spend(tail, spend(head, n - 1))

  defp spend(t, n) when is_tuple(t),
    do: if(tuple_size(t) > n, do: -1, else: spend(Tuple.to_list(t), n - 1))

  defp spend(m, n) when is_map(m),
    do: if(map_size(m) > n, do: -1, else: spend(Map.to_list(m), n - 1))

  defp spend(f, n) when is_function(f) do
    {:env, env} = Function.info(f, :env)
    spend(env, n - 1)
  end

  defp spend(_other, n), do: n - 1

  defp strip_version(interface), do: interface |> String.split("@") |> hd()

  defp wasi?(%{interface: "wasi:" <> _}), do: true
  defp wasi?(_), do: false

  @doc false
  # Runs import `token` of instance `ref` in the caller's runner, which
  # takes the arguments from the NIF and gives the answer there: large
  # values never pass through the caller (no copy, no garbage to collect in
  # a process that may be busy with other work). Returns `:answered` or
  # `:timeout` (the runner was killed).
  def run(ref, token, timeout) do
    {pid, mref} = runner()
    tag = make_ref()
    send(pid, {tag, ref, token})

    receive do
      {^tag, :answered} ->
        :answered

      {:DOWN, ^mref, :process, ^pid, reason} ->
        Process.delete(@runner)

        answer(
          ref,
          token,
          {:error, bounded("the import's runner process exited: #{inspect(reason)}")}
        )

        :answered
    after
      timeout ->
        stop_runner(pid, mref)

        receive do
          {^tag, _late} -> :ok
        after
          0 -> :ok
        end

        :timeout
    end
  end

  defp runner do
    case Process.get(@runner) do
      {pid, _mref} = runner when is_pid(pid) ->
        runner

      nil ->
        caller = self()
        callers = [caller | Process.get(:"$callers", [])]
        {pid, mref} = spawn_monitor(fn -> init_runner(callers) end)
        spawn(fn -> guard(caller, pid) end)
        Process.put(@runner, {pid, mref})
        {pid, mref}
    end
  end

  defp stop_runner(pid, mref) do
    Process.delete(@runner)
    Process.demonitor(mref, [:flush])
    Process.exit(pid, :kill)
  end

  # Kills `runner` if `caller` dies abnormally, even in the middle of an
  # import (the runner itself, busy running it, cannot notice); ends with
  # the runner. Linked to the caller only once it traps exits, so it never
  # misses the caller's death (a caller already dead: `:noproc`), and
  # unlinked before it ends, so that a caller that traps exits gets no
  # `{:EXIT, ...}` message from it.
  defp guard(caller, runner) do
    Process.flag(:trap_exit, true)
    mref = Process.monitor(runner)
    Process.link(caller)

    receive do
      {:EXIT, ^caller, :normal} ->
        :ok

      {:EXIT, ^caller, _reason} ->
        Process.exit(runner, :kill)

      {:DOWN, ^mref, :process, _, _} ->
        Process.unlink(caller)
    end
  end

  # The monitor ends the runner when the caller exits normally (the caller
  # is then not waiting on an import); the guard above, when it dies
  # abnormally.
  defp init_runner([caller | _] = callers) do
    Process.put(:"$callers", callers)
    loop(caller, Process.monitor(caller))
  end

  defp loop(caller, mref) do
    receive do
      {tag, ref, token} ->
        serve(ref, token)
        send(caller, {tag, :answered})
        loop(caller, mref)

      {:DOWN, ^mref, :process, _, _} ->
        :ok
    end
  end

  @doc false
  # Runs import `token` of instance `ref` in the calling process itself (an
  # import given with `inline: true`): no runner, no message, but also
  # nothing to abandon it at the deadline; the call's own deadline stops
  # the guest when the import returns late. Always answers the import.
  def run_inline(ref, token) do
    serve(ref, token)
    :answered
  end

  # Takes the arguments of import `token`, runs it and answers it (nothing
  # to do when the request is stale: the call was cancelled).
  defp serve(ref, token) do
    reply =
      case take(ref, token) do
        {:ok, {fun, args}} -> invoke(fun, args)
        {:error, _} = error -> error
        :stale -> nil
      end

    if reply, do: answer(ref, token, reply)
  end

  # Arguments and answers too large for a normal scheduler are converted
  # on a dirty one.
  defp take(ref, token) do
    case Native.import_take(ref, token) do
      :dirty -> Capsid.Call.dirty(fn -> Native.import_take_dirty(ref, token) end)
      other -> other
    end
  end

  defp answer(ref, token, reply) do
    case Native.import_answer(ref, token, reply) do
      :dirty -> Capsid.Call.dirty(fn -> Native.import_answer_dirty(ref, token, reply) end)
      other -> other
    end
  end

  @doc false
  # `{:ok, result}`, or `{:error, message}` for a raise, throw or exit
  # (bounded: a trap's message is not a channel for megabytes).
  def invoke(fun, args) do
    {:ok, apply(fun, args)}
  rescue
    e -> {:error, bounded(Exception.message(e))}
  catch
    kind, reason -> {:error, bounded(Exception.format_banner(kind, reason))}
  end

  @max_message 4096

  @doc false
  # `message` cut to its first #{@max_message} bytes (at a character
  # boundary) plus how much was left out, before anything copies it into
  # the NIF or a trap. The NIF bounds what reaches it the same way.
  def bounded(message) when byte_size(message) <= @max_message, do: message

  def bounded(message) do
    head = utf8_head(binary_part(message, 0, @max_message))
    "#{head}… #{byte_size(message) - byte_size(head)} bytes more"
  end

  # Drops a character cut in two at the end (at most 3 bytes of one).
  defp utf8_head(head) do
    Enum.find_value(0..3, head, fn drop ->
      candidate = binary_part(head, 0, byte_size(head) - drop)
      if String.valid?(candidate), do: candidate
    end)
  end
end
