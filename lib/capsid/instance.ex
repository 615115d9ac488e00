defmodule Capsid.Instance do
  @moduledoc """
  A live instance of a component: one wasm store with its limits, owned by a
  process you can supervise.

      {:ok, component} = Capsid.Component.load("calc.wasm")
      {:ok, instance} = Capsid.Instance.start_link(component: component, fuel: 10_000_000)
      {:ok, 3} = Capsid.call(instance, "add", [1, 2])

  ## Options

    * `:component` (required) — a `Capsid.Component`.
    * `:imports` — a map from import name to an Elixir function implementing
      it: `%{"log" => fn level, msg -> ... end}`. Root imports go by their
      name; functions of imported interfaces by `"ns:pkg/iface#func"` (with
      or without `@version`). WASI 0.2 is provided by Capsid.
    * `:name` — registers the process, as for `GenServer`.
    * limits — see `Capsid.Limits`.
    * `:max_queue` — callers allowed to wait for their turn (default 10_000);
      past that a call fails at once with a `:busy` error.
    * `:queue_timeout` — how long a caller waits for its turn, in ms
      (default 5_000), before giving up with a `:busy` error.

  ## How calls run

  A call runs in the **calling process**: `Capsid.call/4` enters the NIF
  directly, the guest runs on its own fiber stack for at most one epoch tick
  (≈ 0.5 ms), and the call returns or is polled again. No scheduler is held
  longer than that, and a short call costs one NIF call. One call at a time
  runs per instance; other callers wait in arrival order.

  An import implemented in Elixir runs in a short-lived process spawned by
  the caller (so it can be abandoned when the call's timeout passes); its
  return value goes back to the guest, a raise becomes an `:import_failed`
  trap with the exception's message.

  ## Traps and recycling

  After a trap the store is discarded (wasmtime refuses to re-enter an
  instance that trapped): the next call instantiates the component afresh
  from its pre-linked form, so guest state is reset. `info/1` counts this.
  """

  use GenServer

  alias Capsid.{Component, Error, Limits, Native, Registry, Telemetry, Trap}

  @instance_keys [:component, :imports, :max_queue, :queue_timeout] ++ Limits.keys()
  @default_max_queue 10_000
  @default_queue_timeout 5_000

  @type option ::
          {:component, Component.t()}
          | {:imports, %{String.t() => function()}}
          | {:name, GenServer.name()}
          | {:max_queue, pos_integer()}
          | {:queue_timeout, non_neg_integer()}
          | {atom(), term()}

  @type target :: pid() | GenServer.name()

  @doc """
  Starts an instance linked to the caller.

  Bad options raise `ArgumentError` naming the option. A component whose
  imports are not all provided gives `{:error, %Capsid.Error{kind: :link}}`
  naming each missing import; a trap while instantiating gives
  `{:error, %Capsid.Trap{}}`.

      iex> component = Capsid.Component.load!(Capsid.Guests.path(:toolkit))
      iex> {:error, %Capsid.Error{kind: :link}} = Capsid.Instance.start_link(component: component)
      iex> imports = %{"log" => fn _level, _msg -> :ok end, "get-config" => fn _ -> nil end}
      iex> {:ok, pid} = Capsid.Instance.start_link(component: component, imports: imports)
      iex> Capsid.call(pid, "add", [40, 2])
      {:ok, 42}
  """
  @spec start_link([option()]) :: GenServer.on_start() | {:error, Error.t() | Trap.t()}
  def start_link(opts) do
    {gen_opts, opts} = Keyword.split(opts, [:name])

    with {:ok, prepared} <- prepare(opts) do
      start_prepared(prepared, gen_opts)
    end
  end

  @doc false
  # Validates the options, links and instantiates, all in the caller and
  # before any process exists, so that a bad component is a plain error
  # return and never an exit signal. `Capsid.Pool` prepares its first member
  # this way to report such errors from its own start_link.
  def prepare(opts) do
    config = config!(opts)

    with {:ok, {ref, id}} <- native_new(config),
         {:ok, nil} <- warm_up(ref, id, config) do
      {:ok, {ref, id, config}}
    end
  end

  @doc false
  # Starts the process that owns a prepared instance, linked to the caller.
  def start_prepared(prepared, gen_opts \\ []),
    do: GenServer.start_link(__MODULE__, prepared, gen_opts)

  @doc false
  def child_spec(opts) do
    %{
      id: Keyword.get(opts, :name, __MODULE__),
      start: {__MODULE__, :start_link, [opts]},
      type: :worker
    }
  end

  @doc """
  Counters and settings of an instance: `:calls`, `:traps` (by kind),
  `:recycles`, `:fuel_used` (total), `:instantiations`, `:limits`, and the
  component's `:hash`.

      iex> component = Capsid.Component.load!(Capsid.Guests.path(:faulty))
      iex> {:ok, pid} = Capsid.Instance.start_link(component: component, imports: %{"hook" => & &1})
      iex> {:error, %Capsid.Trap{kind: :unreachable}} = Capsid.call(pid, "hit-unreachable", [])
      iex> info = Capsid.Instance.info(pid)
      iex> {info.calls, info.traps.unreachable, info.recycles}
      {1, 1, 1}
  """
  @spec info(target()) :: map()
  def info(target), do: GenServer.call(target, :info)

  @doc false
  # The call path of `Capsid.call/4`.
  def call(target, function, args, opts) do
    limits =
      case opts do
        [] ->
          {nil, nil, nil}

        _ ->
          Capsid.Options.validate!(
            opts,
            [:queue_timeout | Limits.per_call_keys()],
            "Capsid.call/4"
          )

          Limits.call_values!(opts)
      end

    case resolve(target) do
      {:ok, pid, ref, id, timeouts} ->
        traced(pid, function, fn ->
          case run(ref, id, pid, function, args, opts, limits, timeouts, true) do
            :retired ->
              {{:error, Error.new(:instance_down, "#{inspect(target)} was retired by a hot swap")},
               0}

            result ->
              result
          end
        end)

      {:pool, pid, members} ->
        traced(pid, function, fn ->
          pool_call(target, members, function, args, opts, limits, 5)
        end)

      {:error, _} = error ->
        error
    end
  end

  # A target is a deployment name, a pool, or an instance (pid or name).
  defp resolve(target) when is_atom(target) do
    case Registry.lookup_deployment(target) do
      {:pool, members} -> {:pool, target, members}
      nil -> resolve_pid(GenServer.whereis(target), target)
    end
  end

  defp resolve(target), do: resolve_pid(GenServer.whereis(target), target)

  defp resolve_pid(pid, target) when is_pid(pid) and node(pid) == node() do
    case Registry.lookup(pid) do
      {:ok, ref, id, timeouts} ->
        if Process.alive?(pid), do: {:ok, pid, ref, id, timeouts}, else: down(target)

      {:pool, members} ->
        {:pool, pid, members}

      :error ->
        # A name is registered before init/1 runs: the process may still be
        # starting. A call is served once init/1 is done; then look again.
        if ready?(pid), do: resolve_pid(pid, target, :ready), else: down(target)
    end
  end

  defp resolve_pid(_pid, target), do: down(target)

  defp resolve_pid(pid, target, :ready) do
    case Registry.lookup(pid) do
      {:ok, ref, id, timeouts} -> {:ok, pid, ref, id, timeouts}
      {:pool, members} -> {:pool, pid, members}
      :error -> down(target)
    end
  end

  defp ready?(pid) do
    Process.alive?(pid) and GenServer.call(pid, :capsid_ready, 1_000) == :ok
  catch
    :exit, _ -> false
  end

  defp traced(pid, function, start) do
    if Telemetry.enabled?(), do: observed(pid, function, start), else: elem(start.(), 0)
  end

  # A pool member is picked from the caller's scheduler id, so callers on
  # different schedulers use different members without coordinating. A busy
  # member is skipped; when all are busy the caller queues on its own one.
  # A member retired by a hot swap (or gone) sends the call back to resolve
  # the target again: it then lands on the new version.
  defp pool_call(target, members, function, args, opts, limits, tries) do
    n = tuple_size(members)
    first = rem(:erlang.system_info(:scheduler_id), n)

    case try_members(members, first, 0, n, function, args, opts, limits) do
      :retry when tries > 0 ->
        case resolve(target) do
          {:pool, _, members} -> pool_call(target, members, function, args, opts, limits, tries - 1)
          {:ok, _, _, _, _} -> {down(target), 0}
          {:error, _} = error -> {error, 0}
        end

      :retry ->
        {down(target), 0}

      result ->
        result
    end
  end

  defp try_members(members, first, k, n, function, args, opts, limits) do
    {member, ref, id, timeouts} = elem(members, rem(first + k, n))
    queue = k == n - 1

    with true <- ref != nil,
         result when result not in [:taken, :retired] <-
           run(ref, id, member, function, args, opts, limits, timeouts, queue) do
      result
    else
      :retired -> :retry
      false -> :retry
      :taken when k < n - 1 -> try_members(members, first, k + 1, n, function, args, opts, limits)
    end
  end

  # The common case, a call finished within its first slice, costs one NIF
  # call and no bookkeeping; anything else gets a context to continue with.
  defp run(ref, id, pid, function, args, opts, limits, {timeout, queue_timeout}, queue) do
    case Native.call_start(ref, function, args, limits, queue) do
      {:ok, value, fuel_used} ->
        {{:ok, value}, fuel_used}

      short when short in [:taken, :retired] ->
        short

      other ->
        step(other, %{
          ref: ref,
          id: id,
          pid: pid,
          name: function,
          args: args,
          limits: limits,
          timeout: min(timeout, elem(limits, 1) || timeout),
          # Taken after the first slice: waits on imports and timers may
          # overrun by at most one slice (≤ 1 ms).
          started: System.monotonic_time(:millisecond),
          queue_timeout: Keyword.get(opts, :queue_timeout, queue_timeout),
          imports: :lookup
        })
    end
  end

  defp observed(pid, function, start) do
    meta = %{instance: pid, function: function}
    t0 = System.monotonic_time()

    Telemetry.execute(
      [:capsid, :call, :start],
      %{system_time: System.system_time(), monotonic_time: t0},
      meta
    )

    try do
      {result, fuel} = start.()
      duration = System.monotonic_time() - t0

      outcome =
        case result do
          {:ok, _} -> :ok
          {:error, %Trap{} = trap} -> {:trap, trap}
          {:error, error} -> {:error, error}
        end

      Telemetry.execute(
        [:capsid, :call, :stop],
        %{duration: duration, fuel: fuel},
        Map.put(meta, :result, outcome)
      )

      with {:trap, trap} <- outcome do
        Telemetry.execute([:capsid, :instance, :recycle], %{count: 1}, %{
          instance: pid,
          reason: trap.kind
        })
      end

      result
    catch
      kind, reason ->
        Telemetry.execute(
          [:capsid, :call, :exception],
          %{duration: System.monotonic_time() - t0},
          Map.merge(meta, %{kind: kind, reason: reason, stacktrace: __STACKTRACE__})
        )

        :erlang.raise(kind, reason, __STACKTRACE__)
    end
  end

  defp down(target) do
    {:error, Error.new(:instance_down, "#{inspect(target)} is not a live Capsid instance")}
  end

  # Drives one call to its end (see `call_start` in host_nif/src/instance.rs);
  # returns `{result, fuel_used}`.
  defp step({:ok, value, fuel}, _ctx), do: {{:ok, value}, fuel}

  defp step({:trap, {kind, message, backtrace, stderr}, fuel}, _ctx),
    do: {{:error, %Trap{kind: kind, message: message, backtrace: backtrace, stderr: stderr}}, fuel}

  defp step({:error, {kind, message}}, _ctx), do: {{:error, Error.new(kind, message)}, 0}

  defp step(:yield, ctx), do: step(Native.call_resume(ctx.ref, nil), ctx)

  # Retired while this caller waited in its queue: go to the new version.
  defp step(:retired, _ctx), do: :retired

  defp step(:wait, %{id: id} = ctx) do
    receive do
      {:capsid_wake, ^id} -> step(Native.call_resume(ctx.ref, nil), ctx)
    after
      remaining(ctx) -> step(Native.call_cancel(ctx.ref, ctx.timeout), ctx)
    end
  end

  defp step({:import, key, args}, ctx) do
    imports = if ctx.imports == :lookup, do: Registry.imports(ctx.pid), else: ctx.imports

    case run_import(Map.fetch!(imports, key), args, remaining(ctx)) do
      :timeout -> step(Native.call_cancel(ctx.ref, ctx.timeout), ctx)
      reply -> step(Native.call_resume(ctx.ref, reply), ctx)
    end
  end

  defp step(:queued, %{id: id} = ctx) do
    receive do
      {:capsid_turn, ^id} ->
        step(Native.call_start(ctx.ref, ctx.name, ctx.args, ctx.limits, true), ctx)
    after
      ctx.queue_timeout ->
        Native.call_dequeue(ctx.ref)

        # The turn may have been granted just now; it was passed on already.
        receive do
          {:capsid_turn, ^id} -> :ok
        after
          0 -> :ok
        end

        {{:error,
          Error.new(
            :busy,
            "gave up after waiting #{ctx.queue_timeout} ms for the instance (queue_timeout)"
          )}, 0}
    end
  end

  defp remaining(ctx) do
    max(ctx.started + ctx.timeout - System.monotonic_time(:millisecond), 0)
  end

  # Runs an Elixir import in its own process, so that a slow one can be
  # abandoned when the call's deadline passes. The result travels in the
  # exit reason: one message, no reply protocol.
  defp run_import(fun, args, timeout) do
    callers = [self() | Process.get(:"$callers", [])]

    {pid, mref} =
      spawn_monitor(fn ->
        Process.put(:"$callers", callers)

        result =
          try do
            {:ok, apply(fun, args)}
          rescue
            e -> {:error, Exception.message(e)}
          catch
            kind, reason -> {:error, Exception.format_banner(kind, reason)}
          end

        exit({:capsid_import, result})
      end)

    receive do
      {:DOWN, ^mref, :process, ^pid, {:capsid_import, result}} -> result
      {:DOWN, ^mref, :process, ^pid, reason} -> {:error, "import crashed: #{inspect(reason)}"}
    after
      timeout ->
        Process.exit(pid, :kill)

        receive do
          {:DOWN, ^mref, :process, ^pid, _} -> :ok
        end

        :timeout
    end
  end

  ## Set-up

  defp config!(opts) do
    Capsid.Options.validate!(opts, @instance_keys, "Capsid.Instance.start_link/1")

    component =
      case Keyword.fetch(opts, :component) do
        {:ok, %Component{} = c} ->
          c

        {:ok, other} ->
          raise ArgumentError,
                "invalid value for :component: expected a Capsid.Component, got #{inspect(other)}"

        :error ->
          raise ArgumentError, "missing required option :component (a Capsid.Component)"
      end

    imports = Keyword.get(opts, :imports, %{})
    check_imports!(imports, component)

    %{
      component: component,
      imports: imports,
      limits: Limits.new(opts),
      max_queue: positive!(opts, :max_queue, @default_max_queue),
      queue_timeout: positive!(opts, :queue_timeout, @default_queue_timeout)
    }
  end

  defp positive!(opts, key, default) do
    case Keyword.get(opts, key, default) do
      n when is_integer(n) and n >= 0 ->
        n

      other ->
        raise ArgumentError,
              "invalid value for #{inspect(key)}: expected a non-negative integer, got #{inspect(other)}"
    end
  end

  defp check_imports!(imports, component) when is_map(imports) do
    wanted = component.imports

    for {key, fun} <- imports do
      unless is_binary(key) do
        raise ArgumentError, "invalid key in :imports: expected a string, got #{inspect(key)}"
      end

      import =
        Enum.find(wanted, fn i ->
          i.name == key or
            (i.interface != nil and
               key == "#{String.replace(i.interface, ~r/@.*$/, "")}##{i.function}")
        end)

      cond do
        import == nil ->
          names = wanted |> Enum.reject(&wasi?/1) |> Enum.map_join(", ", &inspect(&1.name))

          raise ArgumentError,
                "unknown import #{inspect(key)} in :imports; the component imports: " <>
                  if(names == "", do: "nothing besides WASI", else: names)

        not is_function(fun) ->
          raise ArgumentError,
                "invalid value for import #{inspect(key)}: expected a function, got #{inspect(fun)}"

        :erlang.fun_info(fun, :arity) != {:arity, length(import.params)} ->
          {:arity, arity} = :erlang.fun_info(fun, :arity)

          raise ArgumentError,
                "import #{inspect(key)} takes #{length(import.params)} argument(s) " <>
                  "(#{Component.signature(import)}), but the function given takes #{arity}"

        true ->
          :ok
      end
    end

    :ok
  end

  defp check_imports!(other, _component) do
    raise ArgumentError,
          "invalid value for :imports: expected a map of name => function, got #{inspect(other)}"
  end

  defp wasi?(%{interface: "wasi:" <> _}), do: true
  defp wasi?(_), do: false

  defp native_new(config) do
    case Native.instance_new(
           config.component.ref,
           Map.keys(config.imports),
           config.limits,
           config.max_queue
         ) do
      {:ok, {ref, id}} -> {:ok, {ref, id}}
      {:error, {kind, message}} -> {:error, Error.new(kind, message)}
    end
  end

  defp warm_up(ref, id, config) do
    ctx = %{
      ref: ref,
      id: id,
      pid: nil,
      name: nil,
      args: [],
      limits: {nil, nil, nil},
      timeout: config.limits.timeout,
      started: System.monotonic_time(:millisecond),
      queue_timeout: config.queue_timeout,
      imports: config.imports
    }

    ref |> Native.call_start(nil, [], {nil, nil, nil}, true) |> step(ctx) |> elem(0)
  end

  ## GenServer

  @impl true
  def init({ref, id, config}) do
    # So that a supervisor's shutdown runs terminate/2 and the instance stops
    # taking calls at once, not when the registry sees it die.
    Process.flag(:trap_exit, true)

    Registry.register(
      self(),
      ref,
      id,
      {config.limits.timeout, config.queue_timeout},
      config.imports
    )

    {:ok, %{ref: ref, config: config}}
  end

  @impl true
  def handle_call(:capsid_ready, _from, state), do: {:reply, :ok, state}

  def handle_call(:info, _from, %{ref: ref, config: config} = state) do
    info =
      ref
      |> Native.instance_info()
      |> Map.merge(%{limits: config.limits, hash: config.component.hash})

    {:reply, info, state}
  end

  @impl true
  def terminate(_reason, _state), do: Registry.unregister(self())
end
