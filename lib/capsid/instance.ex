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
      it: `%{"log" => fn level, msg -> ... end}`, or to `{module, name}` of
      an exported function (`{MyHost, :log}`; `&MyHost.log/2` works too).
      Root imports go by their name; functions of imported interfaces by
      `"ns:pkg/iface#func"` (with or without `@version`), or by the short
      `"func"` when no other imported interface has a function of that name.
      Names the component does not import are ignored, so one map of host
      functions can serve many components. WASI 0.2 is provided by Capsid.
    * `:strict_imports` — `true` makes a name in `:imports` that the
      component does not import an `ArgumentError` (default `false`).

      An import runs in a small runner process of the caller, so that a slow
      one is abandoned at the call's deadline (the call ends in `:timeout`
      and the runner is killed). `{fun, inline: true}` runs it in the
      calling process itself instead, for functions that are quick and
      cannot hang: it sees the caller's process dictionary and Logger
      metadata, and costs about two thirds of a runner's round trip (an
      inline import's whole call is about 2× a trivial call; see
      BENCHMARKS.md). An inline import is never interrupted: a
      call that it keeps past its deadline ends in `:timeout` once it
      returns.
    * `:name` — registers the process, as for `GenServer`.
    * limits — see `Capsid.Limits`.
    * `:max_queue` — callers allowed to wait for their turn (default 10_000);
      past that a call fails at once with a `:busy` error.
    * `:queue_timeout` — how long a caller waits for its turn, in ms
      (default 5_000), before giving up with a `:busy` error.
    * `:wasi` — the WASI capabilities granted (environment, arguments,
      directories, stdin, clock, randomness); none by default. See
      `Capsid.WASI`.

  ## How calls run

  A call runs in the **calling process**: `Capsid.call/4` enters the NIF
  directly, the guest runs on its own fiber stack for at most one epoch tick
  (≈ 0.5 ms), and the call returns or is polled again. No scheduler is held
  longer than that, and a short call costs one NIF call. One call at a time
  runs per instance; other callers wait in arrival order.

  An import implemented in Elixir runs in a helper process that belongs to
  the calling process (started on its first import, reused by the next ones,
  linked so that it dies with the caller), so that a slow import can be
  abandoned when the call's timeout passes: the helper is killed. Its return
  value goes back to the guest; a raise becomes an `:import_failed` trap with
  the exception's message.

  ## Traps and recycling

  After a trap the store is discarded (wasmtime refuses to re-enter an
  instance that trapped): the next call instantiates the component afresh
  from its pre-linked form, so guest state is reset. `info/1` counts this.

  ## Destructors of collected handles

  The guest destructors of resource handles garbage-collected in Elixir
  (see `Capsid.Resource`) run on the instance's own time: the instance
  process runs them as a call of its own, from a process of its own, under
  the instance's limits and in turn with callers, never inside a caller's
  call. A destructor that traps recycles the instance as above (`info/1`
  counts the trap and the recycle, not a call); Logger and the
  `[:capsid, :instance, :destructors]` telemetry event report it.
  """

  use GenServer

  require Logger

  alias Capsid.{Component, Error, Imports, Limits, Native, Trap}

  @instance_keys [:component, :imports, :strict_imports, :max_queue, :queue_timeout, :wasi] ++
                   Limits.keys()
  @default_max_queue 10_000
  @default_queue_timeout 5_000
  # When callers kept the instance busy past the destructors' queue_timeout.
  @destructors_retry 1_000

  @type option ::
          {:component, Component.t()}
          | {:imports, %{String.t() => function() | {function(), inline: boolean()}}}
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
  `{:error, %Capsid.Trap{}}`; a node limit reached (address space, see
  `Capsid.Error`) gives `{:error, %Capsid.Error{kind: :resource_limit}}`.

      iex> component = Capsid.Component.load!(Capsid.Guests.path(:toolkit))
      iex> {:error, %Capsid.Error{kind: :link}} = Capsid.Instance.start_link(component: component)
      iex> imports = %{"log" => fn _level, _msg -> :ok end, "get-config" => fn _ -> nil end}
      iex> {:ok, pid} = Capsid.Instance.start_link(component: component, imports: imports)
      iex> Capsid.call(pid, "add", [40, 2])
      {:ok, 42}
  """
  @spec start_link([option()]) :: GenServer.on_start() | {:error, Error.t() | Trap.t()}
  def start_link(opts) do
    {name, opts} = Keyword.pop(opts, :name)

    with {:ok, prepared} <- prepare(opts) do
      start_prepared(prepared, name)
    end
  end

  @doc """
  Like `start_link/1`, but the instance is not linked to the caller.
  """
  @spec start([option()]) :: GenServer.on_start() | {:error, Error.t() | Trap.t()}
  def start(opts) do
    {name, opts} = Keyword.pop(opts, :name)

    with {:ok, prepared} <- prepare(opts) do
      GenServer.start(__MODULE__, {prepared, name})
    end
  end

  @doc false
  # Validates the options, links and instantiates, all in the caller and
  # before any process exists, so that a bad component is a plain error
  # return and never an exit signal. Pools prepare their members this way.
  def prepare(opts) do
    with {:ok, created} <- create(opts),
         :ok <- Capsid.Call.warm(created.ref),
         do: {:ok, created}
  end

  @doc false
  # The first half of `prepare/1`: the instance without its guest
  # (`Capsid.Call.warm/1` instantiates it). Apart for `bench/density.exs`,
  # which times instantiation alone.
  def create(opts) do
    config = config!(opts)

    case Native.instance_new(
           config.component.ref,
           config.imports,
           config.limits,
           {config.max_queue, config.queue_timeout},
           config.wasi
         ) do
      {:ok, {ref, id}} ->
        # Only what the instance process needs: the component's type
        # information (tens of KB for a WASI component) would be copied
        # into every instance's heap.
        {:ok,
         %{
           ref: ref,
           id: id,
           limits: config.limits,
           queue_timeout: config.queue_timeout,
           hash: config.component.hash
         }}

      {:error, {kind, message}} ->
        {:error, Error.new(kind, message)}
    end
  end

  @doc false
  # Starts the process that owns a prepared instance, linked to the caller,
  # registered under `name` (as `GenServer` names go) once it is ready.
  def start_prepared(prepared, name \\ nil) do
    case GenServer.start_link(__MODULE__, {prepared, name}) do
      {:error, {:already_started, _}} = error -> error
      other -> other
    end
  end

  @doc false
  def default_queue_timeout, do: @default_queue_timeout

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
  `:recycles`, `:fuel_used` (total), `:instantiations`, `:waiting`,
  `:limits`, and the component's `:hash`; with `wasi: [stdout: :capture]`
  (or `stderr:`), `:stdout` and `:stderr`, the newest 64 KiB the guest
  wrote (see `Capsid.WASI`).

      iex> component = Capsid.Component.load!(Capsid.Guests.path(:faulty))
      iex> {:ok, pid} = Capsid.Instance.start_link(component: component, imports: %{"hook" => & &1})
      iex> {:error, %Capsid.Trap{kind: :unreachable}} = Capsid.call(pid, "hit-unreachable", [])
      iex> info = Capsid.Instance.info(pid)
      iex> {info.calls, info.traps.unreachable, info.recycles}
      {1, 1, 1}
  """
  @spec info(target()) :: map()
  def info(target), do: GenServer.call(target, :info)

  ## Set-up

  @doc false
  # Raises ArgumentError for a bad option, as `start_link/1` would, without
  # starting anything (a deployment checks its options in the caller).
  def check!(opts) do
    _ = config!(opts)
    :ok
  end

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

    unless Map.get(component, :fuel_metering, true), do: time_bound!(opts)

    %{
      component: component,
      imports: Imports.check!(Keyword.get(opts, :imports, %{}), component, strict!(opts)),
      limits: Limits.new(opts),
      max_queue: non_negative!(opts, :max_queue, @default_max_queue),
      queue_timeout: non_negative!(opts, :queue_timeout, @default_queue_timeout),
      wasi: Capsid.WASI.native!(Keyword.get(opts, :wasi, []))
    }
  end

  # A component without fuel metering is bounded by its timeout alone.
  defp time_bound!(opts) do
    case Keyword.get(opts, :fuel, :infinity) do
      :infinity ->
        :ok

      fuel ->
        raise ArgumentError,
              "invalid value for :fuel: #{inspect(fuel)}: the component was loaded with " <>
                "fuel_metering: false, so it has no fuel to limit; bound it with :timeout"
    end

    if Keyword.get(opts, :timeout) == :infinity do
      raise ArgumentError,
            "invalid value for :timeout: :infinity: the component was loaded with " <>
              "fuel_metering: false, so its timeout is its only bound"
    end
  end

  defp strict!(opts) do
    case Keyword.get(opts, :strict_imports, false) do
      strict when is_boolean(strict) ->
        strict

      other ->
        raise ArgumentError,
              "invalid value for :strict_imports: expected a boolean, got #{inspect(other)}"
    end
  end

  defp non_negative!(opts, key, default) do
    case Keyword.get(opts, key, default) do
      n when is_integer(n) and n >= 0 ->
        n

      other ->
        raise ArgumentError,
              "invalid value for #{inspect(key)}: expected a non-negative integer, got #{inspect(other)}"
    end
  end

  ## GenServer

  @impl true
  def init({prepared, name}) do
    # So that a supervisor's shutdown runs terminate/2 and the instance stops
    # taking calls at once.
    Process.flag(:trap_exit, true)
    # For a call from another node: how long it may take here at most.
    Capsid.Cluster.remember_limits(prepared.limits.timeout, prepared.queue_timeout)

    case Capsid.Registry.register(prepared.ref, name) do
      :ok -> {:ok, prepared}
      {:error, reason} -> {:stop, reason}
    end
  end

  @impl true
  def handle_call(:info, _from, %{ref: ref} = state) do
    info =
      ref
      |> Native.instance_info()
      |> Map.merge(%{limits: state.limits, hash: state.hash})
      |> Map.merge(Map.get(state, :output, %{}))

    {:reply, info, state}
  end

  # Output captured for `wasi: [stdout: :capture]` (see Capsid.WASI): the
  # newest 64 KiB per stream.
  @impl true
  def handle_info({:"$capsid_output", stream, bytes}, state) do
    output = Map.get(state, :output, %{stdout: "", stderr: ""})
    kept = Map.fetch!(output, stream) <> bytes
    kept = binary_part(kept, max(byte_size(kept) - 65_536, 0), min(byte_size(kept), 65_536))
    {:noreply, Map.put(state, :output, Map.put(output, stream, kept))}
  end

  # A handle of this instance was garbage-collected and its guest
  # destructor queued (see `Capsid.Resource`). Destructors run on the
  # instance's own time, never inside a caller's call: in a process of the
  # instance's (so that `info/1` keeps answering), one at a time.
  def handle_info({:capsid_drops, _id}, state), do: {:noreply, destroy(state)}

  def handle_info({:DOWN, mref, :process, _pid, reason}, %{destroyer: mref} = state) do
    state = Map.delete(state, :destroyer)

    cond do
      reason == :busy ->
        # Callers kept the instance busy past its queue_timeout: later.
        Process.send_after(self(), {:capsid_drops, state.id}, @destructors_retry)
        {:noreply, state}

      Map.get(state, :destroy_again, false) ->
        {:noreply, state |> Map.delete(:destroy_again) |> destroy()}

      true ->
        {:noreply, state}
    end
  end

  def handle_info(_other, state), do: {:noreply, state}

  defp destroy(%{destroyer: _} = state), do: Map.put(state, :destroy_again, true)

  defp destroy(%{ref: ref} = state) do
    instance = self()
    {_pid, mref} = spawn_monitor(fn -> exit(run_destructors(ref, instance)) end)
    Map.put(state, :destroyer, mref)
  end

  # The destructors' own call, under the instance's limits. What it costs,
  # and how it failed, are reported here (Logger, telemetry), never to a
  # caller; its output goes where the instance's `wasi:` options send
  # output. A trap recycles the instance, as any trap does.
  defp run_destructors(ref, instance) do
    t0 = System.monotonic_time()
    {result, fuel} = Capsid.Call.drain(ref)
    duration = System.monotonic_time() - t0

    outcome =
      case result do
        {:ok, _} -> :ok
        {:error, %Trap{} = trap} -> {:trap, trap}
        {:error, error} -> {:error, error}
      end

    report(outcome, instance)

    Capsid.Telemetry.execute(
      [:capsid, :instance, :destructors],
      %{duration: duration, fuel: fuel},
      %{
        instance: instance,
        result: outcome
      }
    )

    case outcome do
      {:trap, trap} ->
        Capsid.Telemetry.execute([:capsid, :instance, :recycle], %{count: 1}, %{
          instance: instance,
          reason: trap.kind
        })

        :normal

      {:error, %Error{kind: :busy}} ->
        :busy

      _ ->
        :normal
    end
  end

  @stderr_logged 4_096

  defp report({:trap, trap}, instance) do
    stderr =
      case trap.stderr do
        "" ->
          ""

        err when byte_size(err) > @stderr_logged ->
          "; guest stderr: " <>
            inspect(binary_part(err, 0, @stderr_logged)) <>
            " (#{byte_size(err) - @stderr_logged} bytes more)"

        err ->
          "; guest stderr: " <> inspect(err)
      end

    Logger.warning(
      "Capsid: a destructor of a garbage-collected resource handle trapped " <>
        "(#{inspect(trap.kind)}: #{trap.message}); the instance recycled, as after any " <>
        "trap: its guest state and its handles are gone" <> stderr,
      capsid_instance: instance
    )
  end

  # Retired (stopped or swapped): the objects went with the instance.
  defp report({:error, %Error{kind: kind}}, _instance) when kind in [:busy, :instance_down],
    do: :ok

  defp report({:error, error}, instance) do
    Logger.warning(
      "Capsid: the destructors of garbage-collected resource handles could not run: " <>
        Exception.message(error),
      capsid_instance: instance
    )
  end

  defp report(:ok, _instance), do: :ok

  @impl true
  def terminate(_reason, _state), do: Capsid.Registry.unregister()
end
