defmodule Capsid.Deployment do
  @moduledoc """
  A named set of instances of one component version, upgraded in place,
  BEAM-style. Use it through `Capsid.deploy/3`, `Capsid.call/4` (with the
  deployment's name), `Capsid.versions/1`, `Capsid.rollback/1` and
  `Capsid.undeploy/1`, or put it in your own supervision tree:

      children = [
        {Capsid.Deployment, name: :pricing, component: "priv/guests/pricing.wasm", size: 4}
      ]

  A name may be any term (`{:tenant, 42}` works as well as `:pricing`).
  A deployment that serves joins the cluster's membership: other nodes
  route calls by its name here, and `Capsid.deploy/3` with `nodes:` deploys
  and upgrades it on many nodes at once (see `Capsid.Cluster`).

  Each version is a `Capsid.Pool` of `:size` instances (default: one per
  scheduler); calls by the deployment's name go to the current version's
  pool.

  ## An upgrade

  1. The new version is compiled (through the code cache) in the caller.
  2. Unless `force: true`, it must keep every function the current version
     exports, with the same WIT type; `capsid:host/lifecycle` is the host's
     own protocol and is not part of this check.
  3. Its pool is started (instances linked, instantiated): a link error or a
     trap here leaves the current version serving.
  4. If both versions export `capsid:host/lifecycle`, the state moves
     (see "State across a swap" below); a failure aborts the upgrade and
     the current version keeps serving, as it was.
  5. The switch: one atomic write of the name → pool entry. Every call that
     starts afterwards runs on the new version; the old pool is retired (a
     call that had picked one of its instances before the switch is turned
     away and retried on the new version, never failed), and stops once the
     calls already running on it have finished.

  The previous version's compiled component stays in memory for
  `Capsid.rollback/1`, which swaps back the same way.

  ## State across a swap

  When both versions export `capsid:host/lifecycle`, each old member is
  *held* first: the calls already running on it or waiting for it finish,
  then the upgrade keeps its turn until the switch; callers arriving
  meanwhile wait (within their `:queue_timeout`) and then run on the new
  version. So every call that returned `{:ok, _}` before the switch is in
  the state handed over, and none runs on an old member after its
  snapshot.

  A failed upgrade must leave every serving instance as it was. The host
  cannot copy a store whole (wasmtime exposes a component's linear
  memories, not its globals, tables or resources), and `snapshot` may
  change the instance it runs in (move the state out) or trap (the store is
  then unusable). So the handoff is rehearsed first, on copies: for each
  old member, a scratch instance of the running version holding a copy of
  its memories runs `snapshot`, and scratch instances of the new version
  run `restore` with what that gave. A failure there aborts the upgrade
  before any serving instance was entered: their memories, globals, tables
  and resources are untouched. Only then do the serving instances run
  `snapshot` for real, and the new members `restore`.

  A guest can still fail only for real (it behaves differently in the copy,
  whose globals start afresh). Then the upgrade is aborted and put right as
  far as the guest allows, and logged: an old member whose snapshot
  returned gets its bytes back through its own `restore` (a snapshot may
  have moved the state out, so `restore` must replace the state, not add
  to it), and one whose snapshot trapped comes back with the memories it
  had before (its globals and tables start afresh). `snapshot` and
  `restore` may therefore run twice per upgrade and should have no effect
  outside the instance; the copies get no WASI output.

  Each old member is snapshotted once. New member `i` gets old member `i`'s
  state (a larger pool repeats them in order). A pool that shrinks would
  lose the state of the members it no longer has, so such an upgrade is
  refused with an `:incompatible` error unless it says what to do:
  `merge: fun` (given the list of every old member's snapshot, in member
  order, returns the list of states for the new members, one per member;
  also usable when the size stays) or `drop_state: true` (the extra
  members' state is dropped). Both apply to the one upgrade given them.

  If a deployment process crashes, its supervisor restarts it on the
  version it was serving (with its previous version still available for
  rollback), not on the one it was first deployed with.
  """

  use GenServer
  require Logger

  alias Capsid.{Component, Error, Instance, Native, Pool, Registry, Telemetry}

  @lifecycle "capsid:host/lifecycle@0.1.0"

  @instance_keys [:imports, :strict_imports, :max_queue, :queue_timeout, :wasi] ++
                   Capsid.Limits.keys()
  # The options a deployment hands to `Capsid.Component.load/2`.
  @load_keys [:cache, :guard_pages, :fuel_metering]
  # How an upgrade hands state over; they apply to one upgrade only.
  @handoff_keys [:merge, :drop_state]
  @deploy_keys [:size, :force, :watch, :watch_interval] ++
                 @handoff_keys ++ @load_keys ++ @instance_keys
  # How long an upgrade waits for an old member's running calls to end.
  @hold_timeout 30_000

  @type name :: term()

  @doc """
  A child spec for your supervision tree: `{Capsid.Deployment, opts}` with
  `:name` (any term) and `:component` (a path, the bytes, or a
  `Capsid.Component`), plus the options of `Capsid.deploy/3`.
  """
  def child_spec(opts) when is_list(opts) do
    name = Keyword.fetch!(opts, :name)

    %{
      id: {__MODULE__, name},
      start: {__MODULE__, :start_link, [opts]},
      shutdown: 30_000
    }
  end

  def child_spec(arg) when is_tuple(arg) and tuple_size(arg) in [4, 5] do
    name = elem(arg, 0)

    # Shutdown stops every member in turn, each finishing its running call.
    %{
      id: {__MODULE__, name},
      start: {__MODULE__, :start_link, [arg]},
      restart: :transient,
      shutdown: 30_000
    }
  end

  @doc """
  Starts a deployment linked to the caller (see `child_spec/1`).
  """
  @spec start_link(keyword() | tuple()) :: GenServer.on_start()
  def start_link(opts) when is_list(opts) do
    {name, opts} = Keyword.pop(opts, :name)
    {source, opts} = Keyword.pop(opts, :component)

    if source == nil do
      raise ArgumentError,
            "missing required option :component (a path, the bytes or a Capsid.Component)"
    end

    Capsid.Options.validate!(opts, @deploy_keys, "Capsid.Deployment.start_link/1")

    with {:ok, component} <- load(source, opts) do
      check!(component, opts)
      start_link({name, component, source, opts})
    end
  end

  def start_link(arg) when is_tuple(arg) and tuple_size(arg) in [4, 5] do
    GenServer.start_link(__MODULE__, arg, name: via(elem(arg, 0)))
  end

  @doc false
  def deploy_keys, do: @deploy_keys

  @doc false
  def load_keys, do: @load_keys

  @doc false
  # Starts a deployment that does not serve yet: a cluster-wide deploy
  # (`Capsid.Cluster`) publishes it on `{:commit, agent}`, and it stops if
  # `agent` exits first.
  def start_pending(name, component, source, opts, agent) do
    DynamicSupervisor.start_child(
      Capsid.DeploymentSupervisor,
      {__MODULE__, {name, component, source, opts, {:pending, agent}}}
    )
  end

  defp via(name), do: {:via, Elixir.Registry, {Capsid.Deployments, name}}

  defp load(%Component{} = component, _opts), do: {:ok, component}
  defp load(source, opts), do: Component.load(source, Keyword.take(opts, @load_keys))

  @doc false
  def whereis(name) do
    case Elixir.Registry.lookup(Capsid.Deployments, name) do
      [{pid, _}] -> pid
      [] -> nil
    end
  end

  @doc false
  def deploy(name, source, opts) do
    Capsid.Options.validate!(opts, @deploy_keys, "Capsid.deploy/3")

    if Keyword.get(opts, :watch, false) and not is_binary(source) do
      raise ArgumentError, "watch: true needs a file path to watch"
    end

    if Keyword.get(opts, :watch, false) and match?(<<"\0asm", _::binary>>, source) do
      raise ArgumentError, "watch: true needs a file path to watch, not the component's bytes"
    end

    t0 = System.monotonic_time()

    with {:ok, component} <- load(source, opts) do
      check!(component, opts)

      result =
        case whereis(name) do
          nil ->
            case DynamicSupervisor.start_child(
                   Capsid.DeploymentSupervisor,
                   {__MODULE__, {name, component, source, opts}}
                 ) do
              {:ok, pid} -> server_call(pid, :versions)
              {:error, {:already_started, pid}} -> upgrade(pid, component, source, opts)
              {:error, reason} -> {:error, unwrap(reason)}
            end

          pid ->
            upgrade(pid, component, source, opts)
        end

      with {:ok, info} <- result do
        {:ok,
         Map.put(
           info,
           :duration_us,
           System.convert_time_unit(System.monotonic_time() - t0, :native, :microsecond)
         )}
      end
    end
  end

  # Bad option values raise here, in the caller, as they would for an
  # instance; they must not reach the deployment process.
  defp check!(component, opts) do
    case Keyword.get(opts, :merge) do
      nil ->
        :ok

      fun when is_function(fun, 1) ->
        :ok

      other ->
        raise ArgumentError,
              "invalid value for :merge: expected a function of one argument " <>
                "(the list of the old members' snapshots), got #{inspect(other)}"
    end

    unless is_boolean(Keyword.get(opts, :drop_state, false)) do
      raise ArgumentError,
            "invalid value for :drop_state: expected a boolean, got " <>
              inspect(Keyword.get(opts, :drop_state))
    end

    Instance.check!([component: component] ++ Keyword.take(opts, @instance_keys))
  end

  defp upgrade(pid, component, source, opts) do
    server_call(pid, {:upgrade, component, source, opts})
  end

  # The stdlib Registry forgets a dead process asynchronously, so a lookup
  # can still return a deployment that just stopped.
  defp server_call(pid, request) do
    GenServer.call(pid, request, :infinity)
  catch
    :exit, {reason, _} when reason in [:noproc, :normal, :shutdown] ->
      {:error, Error.new(:instance_down, "the deployment stopped")}
  end

  @doc false
  # The exception inside a deployment's or pool's start error.
  def unwrap(%{__exception__: true} = e), do: e
  def unwrap({%{__exception__: true} = e, _stack}), do: e
  def unwrap({:shutdown, %{__exception__: true} = e}), do: e
  def unwrap(other), do: Error.new(:internal, "deployment failed to start: #{inspect(other)}")

  @doc false
  def call_server(name, request) do
    case whereis(name) do
      nil -> {:error, Error.new(:instance_down, "no deployment named #{inspect(name)}")}
      pid -> server_call(pid, request)
    end
  end

  @doc false
  def undeploy(name) do
    case whereis(name) do
      nil ->
        {:error, Error.new(:instance_down, "no deployment named #{inspect(name)}")}

      pid ->
        case DynamicSupervisor.terminate_child(Capsid.DeploymentSupervisor, pid) do
          :ok ->
            :ok

          {:error, :not_found} ->
            # Not supervised, or already gone while its name was still
            # registered (an undeploy that raced another one).
            try do
              GenServer.stop(pid, :shutdown)
            catch
              :exit, _ ->
                {:error, Error.new(:instance_down, "no deployment named #{inspect(name)}")}
            end
        end
    end
  end

  ## Compatibility

  @doc false
  # Every function `old` exports must exist in `new` with the same type
  # (components, or anything with their `:exports`).
  def incompatibilities(%{exports: _} = old, %{exports: _} = new) do
    new_exports = Map.new(new.exports, &{&1.name, &1})

    for e <- old.exports, not String.starts_with?(e.name, @lifecycle), reduce: [] do
      acc ->
        case Map.fetch(new_exports, e.name) do
          :error ->
            ["#{e.name} is missing (was #{Capsid.Types.signature(e.params, e.result)})" | acc]

          {:ok, n} when n.params != e.params or n.result != e.result ->
            [
              "#{e.name} changed type: #{Capsid.Types.signature(e.params, e.result)} → " <>
                Capsid.Types.signature(n.params, n.result)
              | acc
            ]

          {:ok, _} ->
            acc
        end
    end
    |> Enum.reverse()
  end

  defp lifecycle?(%Component{exports: exports}) do
    names = MapSet.new(exports, & &1.name)

    MapSet.member?(names, "#{@lifecycle}#snapshot") and
      MapSet.member?(names, "#{@lifecycle}#restore")
  end

  ## Server

  @impl true
  def init({name, component, source, opts}), do: init({name, component, source, opts, nil})

  def init({name, component, source, opts, pending}) do
    Process.flag(:trap_exit, true)

    # After a crash, the supervisor restarts us with the arguments of the
    # first deploy: come back on the version that was serving instead.
    case Registry.recall_deployment(name) do
      %{current: c, previous: p, opts: o} ->
        start(name, c.component, c.source, c.opts || o, o, c.number, p, nil)

      nil ->
        start(name, component, source, opts, opts, 1, nil, pending)
    end
  end

  defp start(name, component, source, pool_opts, opts, number, previous, pending) do
    case start_pool(component, pool_opts) do
      {:ok, pool} ->
        state = %{
          name: name,
          opts: opts,
          current: version(component, pool, source, number, pool_opts),
          previous: previous,
          number: number,
          retiring: %{},
          watch: nil,
          pending: nil,
          published: false
        }

        case pending do
          # Staged by a cluster-wide deploy: serves once that commits.
          {:pending, agent} ->
            pending = %{agent: agent, monitor: Process.monitor(agent), kind: :start}
            {:ok, %{state | pending: pending}}

          nil ->
            {:ok, state |> publish() |> maybe_watch()}
        end

      {:error, error} ->
        {:stop, error}
    end
  end

  # The deployment serves from now on: its name points at the current pool,
  # and the cluster knows this node holds it.
  defp publish(state) do
    Registry.put_name(state.name, state.current.pool.ref)
    Capsid.Cluster.join(state.name, state.current.component.hash)
    remember(%{state | published: true})
  end

  defp remember(state) do
    # For a call from another node: how long it may take here at most
    # (`Capsid.Cluster` reads it with the registry's lookup).
    {timeout, queue_timeout} = Capsid.Cluster.limits_of(state.current.opts || state.opts)
    limits = Capsid.Cluster.remember_limits(timeout, queue_timeout)
    Elixir.Registry.update_value(Capsid.Deployments, state.name, fn _ -> limits end)

    Registry.remember_deployment(state.name, %{
      current: %{state.current | pool: nil},
      previous: state.previous,
      opts: state.opts
    })

    state
  end

  @impl true
  def handle_call(:versions, _from, state), do: {:reply, {:ok, versions(state)}, state}

  def handle_call(request, _from, %{pending: pending} = state)
      when pending != nil and
             (request == :rollback or elem(request, 0) in [:upgrade, :prepare]) do
    {:reply,
     {:error,
      Error.new(
        :busy,
        "#{inspect(state.name)} is in the middle of a cluster-wide upgrade; try again when it is done"
      )}, state}
  end

  def handle_call({:upgrade, component, source, opts}, _from, state) do
    opts = Keyword.merge(Keyword.drop(state.opts, @handoff_keys), opts)

    case swap(state, component, source, opts, Keyword.get(opts, :force, false), :swap) do
      {:ok, state} -> {:reply, {:ok, versions(state)}, state}
      {:error, error} -> {:reply, {:error, error}, state}
    end
  end

  def handle_call(:rollback, _from, %{previous: nil} = state) do
    {:reply, {:error, no_previous(state)}, state}
  end

  def handle_call(:rollback, _from, %{previous: prev} = state) do
    case swap(state, prev.component, prev.source, prev.opts || state.opts, true, :rollback) do
      {:ok, state} -> {:reply, {:ok, versions(state)}, state}
      {:error, error} -> {:reply, {:error, error}, state}
    end
  end

  # The two steps of a cluster-wide upgrade (`Capsid.Cluster`): `:prepare`
  # starts the new version's pool and hands the state over, `:commit`
  # switches. Until the commit the running version serves; if `agent`
  # exits first, the prepared pool is stopped.
  def handle_call({:prepare, _agent, :rollback, _, _, _}, _from, %{previous: nil} = state) do
    {:reply, {:error, no_previous(state)}, state}
  end

  def handle_call({:prepare, agent, kind, component, source, opts}, _from, state) do
    {component, source, opts} =
      case kind do
        :rollback -> {state.previous.component, state.previous.source, state.previous.opts}
        :swap -> {component, source, Keyword.merge(state.current.opts, opts)}
      end

    opts = opts || state.opts
    t0 = System.monotonic_time()

    if kind == :swap and component.hash == state.current.component.hash and
         Enum.sort(opts) == Enum.sort(state.current.opts) do
      {:reply, {:ok, :unchanged}, state}
    else
      case prepare_pool(state, component, opts) do
        {:ok, pool, held} ->
          pending = %{
            agent: agent,
            monitor: Process.monitor(agent),
            kind: kind,
            pool: pool,
            held: held,
            component: component,
            source: source,
            opts: opts,
            t0: t0
          }

          {:reply, {:ok, :prepared}, %{state | pending: pending}}

        {:error, error} ->
          {:reply, {:error, error}, state}
      end
    end
  end

  def handle_call({:commit, agent}, _from, %{pending: %{agent: agent} = p} = state) do
    Process.demonitor(p.monitor, [:flush])
    state = %{state | pending: nil}

    state =
      case p.kind do
        :start -> state |> publish() |> maybe_watch()
        kind -> commit_swap(state, {p.pool, p.held}, p.component, p.source, p.opts, kind, p.t0)
      end

    {:reply, {:ok, versions(state)}, state}
  end

  def handle_call({:commit, _agent}, _from, state) do
    {:reply,
     {:error,
      Error.new(
        :instance_down,
        "the prepared version of #{inspect(state.name)} is gone (its pool stopped before the switch)"
      )}, state}
  end

  def handle_call({:abort, agent}, _from, %{pending: %{agent: agent}} = state) do
    case abort(state) do
      {:stop, state} -> {:stop, :shutdown, :ok, state}
      {:ok, state} -> {:reply, :ok, state}
    end
  end

  def handle_call({:abort, _agent}, _from, state), do: {:reply, :ok, state}

  defp no_previous(state) do
    Error.new(:not_found, "#{inspect(state.name)} has no previous version to roll back to")
  end

  # A prepared version that is not switched to: a staged deployment stops,
  # an upgrade's new pool is stopped and the running version stays.
  defp abort(%{pending: %{kind: :start}} = state), do: {:stop, state}

  defp abort(%{pending: p} = state) do
    Process.demonitor(p.monitor, [:flush])
    release(p.held)
    stop_pool(p.pool.pid)
    {:ok, %{state | pending: nil}}
  end

  @impl true
  def handle_info({:EXIT, pid, reason}, state) do
    cond do
      pid == state.current.pool.pid ->
        # The current pool died (its members are replaced by the pool
        # itself; this is the pool process). Start the same version again.
        case start_pool(state.current.component, state.current.opts) do
          {:ok, pool} ->
            if state.published, do: Registry.put_name(state.name, pool.ref)
            {:noreply, put_in(state.current.pool, pool)}

          {:error, error} ->
            {:stop, {:shutdown, error}, state}
        end

      state.pending != nil and state.pending[:pool] != nil and pid == state.pending.pool.pid ->
        # The prepared version's pool died: the commit will say so.
        Process.demonitor(state.pending.monitor, [:flush])
        release(state.pending.held)
        {:noreply, %{state | pending: nil}}

      Map.has_key?(state.retiring, pid) ->
        {:noreply, %{state | retiring: Map.delete(state.retiring, pid)}}

      true ->
        # The parent's exit never gets here: gen_server handles it.
        _ = reason
        {:noreply, state}
    end
  end

  def handle_info({:DOWN, ref, :process, _, _}, %{pending: %{monitor: ref}} = state) do
    # The cluster-wide deploy that prepared this is gone without a commit.
    case abort(state) do
      {:stop, state} -> {:stop, :shutdown, state}
      {:ok, state} -> {:noreply, state}
    end
  end

  def handle_info(:drain, state) do
    # Stop retired pools whose last call has finished.
    retiring =
      Enum.reduce(state.retiring, state.retiring, fn {pid, refs}, acc ->
        if Enum.all?(refs, &Native.instance_idle/1) do
          stop_pool(pid)
          Map.delete(acc, pid)
        else
          acc
        end
      end)

    if map_size(retiring) > 0, do: Process.send_after(self(), :drain, 5)
    {:noreply, %{state | retiring: retiring}}
  end

  def handle_info(:watch, %{watch: watch} = state) do
    state =
      case read_regular(watch.path) do
        {:ok, bytes} ->
          hash = Capsid.NIF.sha256(bytes)

          if hash in [state.current.component.hash, watch.failed],
            do: state,
            else: reload(state, bytes, hash)

        {:error, _} ->
          state
      end

    Process.send_after(self(), :watch, watch.interval)
    {:noreply, state}
  end

  def handle_info(_msg, state), do: {:noreply, state}

  @impl true
  def terminate(reason, state) do
    # A deliberate stop (undeploy) forgets the deployment; a crash keeps it
    # for the restart.
    if reason in [:normal, :shutdown] or match?({:shutdown, _}, reason) do
      Registry.forget_deployment(state.name)
    end

    if state.published, do: Registry.put_name(state.name, nil)
    Capsid.Cluster.leave(state.name, state.current.component.hash)
    pending = if state.pending && state.pending[:pool], do: [state.pending.pool.pid], else: []
    Enum.each([state.current.pool.pid | pending] ++ Map.keys(state.retiring), &stop_pool/1)
    :ok
  end

  # The watched path is read only when it is a regular file of sane size: a
  # FIFO planted there would block this process forever.
  @watch_max_bytes 512 * 1024 * 1024

  defp read_regular(path) do
    case File.stat(path) do
      {:ok, %File.Stat{type: :regular, size: size}} when size <= @watch_max_bytes -> File.read(path)
      {:ok, %File.Stat{type: :regular}} -> {:error, :too_large}
      {:ok, %File.Stat{}} -> {:error, :not_a_regular_file}
      error -> error
    end
  end

  defp reload(state, bytes, hash) do
    path = state.watch.path
    force = Keyword.get(state.opts, :force, false)

    with {:ok, component} <- Component.load(bytes, Keyword.take(state.opts, @load_keys)),
         {:ok, new_state} <- swap(state, component, path, state.current.opts, force, :swap) do
      Logger.info(
        "Capsid: #{inspect(state.name)} reloaded #{path} (sha256 #{String.slice(hash, 0, 12)})"
      )

      %{new_state | watch: %{new_state.watch | last_error: nil}}
    else
      {:error, error} ->
        Logger.warning(
          "Capsid: #{inspect(state.name)} kept the running version; #{path} failed: " <>
            Exception.message(error)
        )

        # Not retried until the file changes again.
        %{state | watch: %{state.watch | failed: hash, last_error: error}}
    end
  end

  defp maybe_watch(state) do
    case {Keyword.get(state.opts, :watch, false), state.current.source} do
      {true, path} when is_binary(path) ->
        interval = Keyword.get(state.opts, :watch_interval, 1_000)
        Process.send_after(self(), :watch, interval)
        %{state | watch: %{path: path, interval: interval, failed: nil, last_error: nil}}

      _ ->
        state
    end
  end

  defp swap(state, component, source, opts, force, event) do
    t0 = System.monotonic_time()

    with :ok <- check(state.current.component, component, force),
         {:ok, pool, held} <- prepare_pool(state, component, opts) do
      {:ok, commit_swap(state, {pool, held}, component, source, opts, event, t0)}
    end
  end

  # The new version's pool, started and seeded with the running version's
  # state; nothing serves from it yet. `held`: the old members held until
  # the switch (or the abort), so that nothing runs on them after their
  # snapshot.
  defp prepare_pool(state, component, opts) do
    with {:ok, pool} <- start_pool(component, opts),
         {:ok, held} <- hand_over(state.current, component, pool, opts),
         do: {:ok, pool, held}
  end

  defp commit_swap(state, {pool, held}, component, source, opts, event, t0) do
    old = state.current
    # An old pool that died since the preparation has no member to drain.
    old_members = old_members(old.pool.pid)
    # One atomic write: every call that starts afterwards goes to `pool`.
    Registry.put_name(state.name, pool.ref)
    # Calls that picked an old member before the switch are turned away
    # by the retire flag and retry on the new version.
    Native.pool_retire(old.pool.ref)
    # The callers that waited for a held member were just turned away by
    # the retirement, and go to the new version.
    release(held)
    Capsid.Cluster.switch(state.name, old.component.hash, component.hash)
    send(self(), :drain)
    number = state.number + 1

    Telemetry.execute(
      [:capsid, :deploy, event],
      %{duration: System.monotonic_time() - t0},
      %{name: state.name, old_hash: old.component.hash, new_hash: component.hash}
    )

    state = %{
      state
      | current: version(component, pool, source, number, opts),
        previous: %{old | pool: nil},
        number: number,
        retiring: Map.put(state.retiring, old.pool.pid, old_members)
    }

    remember(state)
  end

  defp old_members(pid) do
    {_, members} = Pool.refs(pid)
    members
  catch
    :exit, _ -> []
  end

  defp check(_old, _new, true), do: :ok

  defp check(old, new, false) do
    case incompatibilities(old, new) do
      [] ->
        :ok

      problems ->
        {:error,
         Error.new(
           :incompatible,
           "the new version is not compatible with the running one (pass force: true to deploy anyway): " <>
             Enum.join(problems, "; ")
         )}
    end
  end

  # Moves the running version's state into the new pool (see "State across
  # a swap" in the moduledoc): `{:ok, held}`, the old members now held, or
  # an error, with the new pool stopped and the old members serving.
  defp hand_over(old, component, pool, opts) do
    if lifecycle?(old.component) and lifecycle?(component) do
      with {:ok, {_, olds}} <- refs(old.pool.pid, pool),
           {:ok, {_, news}} <- refs(pool.pid, pool),
           :ok <- check_shrink(length(olds), length(news), opts, pool),
           {:ok, held} <- hold(olds, pool) do
        case move_state(old, component, opts, olds, news) do
          :ok ->
            {:ok, held}

          {:error, error} ->
            release(held)
            stop_pool(pool.pid)

            # A guest's failure is a `:link` error; the host's own (a
            # bad `merge:`) keeps its kind.
            kind = if match?(%Error{}, error), do: error.kind, else: :link

            {:error,
             Error.new(
               kind,
               "state handoff failed, the running version keeps serving: " <>
                 Exception.message(error)
             )}
        end
      end
    else
      {:ok, []}
    end
  end

  defp check_shrink(from, to, opts, pool) do
    if to < from and Keyword.get(opts, :merge) == nil and not Keyword.get(opts, :drop_state, false) do
      stop_pool(pool.pid)

      {:error,
       Error.new(
         :incompatible,
         "the upgrade shrinks the pool from #{from} to #{to} members, which would lose the " <>
           "state of #{from - to}: pass merge: fn snapshots -> states end (given the #{from} " <>
           "members' snapshots, it returns #{to} states) or drop_state: true to drop it"
       )}
    else
      :ok
    end
  end

  # Takes each old member's turn once its running and waiting calls are
  # done, and keeps it (`instance_hold`) until `release/1`.
  defp hold(refs, pool) do
    Enum.reduce_while(refs, {:ok, []}, fn ref, {:ok, held} ->
      case hold_one(ref, System.monotonic_time(:millisecond) + @hold_timeout) do
        :ok ->
          {:cont, {:ok, [ref | held]}}

        {:error, error} ->
          release(held)
          stop_pool(pool.pid)
          {:halt, {:error, error}}
      end
    end)
  end

  defp hold_one(ref, deadline) do
    case Native.instance_hold(ref) do
      :ok ->
        :ok

      :retired ->
        {:error, Error.new(:instance_down, "the running version stopped during the upgrade")}

      {:queued, id} ->
        receive do
          # Granted (or retired meanwhile): ask again, which says which.
          {:capsid_turn, ^id} -> hold_one(ref, deadline)
        after
          max(deadline - System.monotonic_time(:millisecond), 0) ->
            Native.instance_unhold(ref)

            receive do
              {:capsid_turn, ^id} -> :ok
            after
              0 -> :ok
            end

            {:error,
             Error.new(
               :busy,
               "the running version's calls did not end within #{@hold_timeout} ms; " <>
                 "the upgrade was not applied"
             )}
        end
    end
  end

  defp release(held), do: Enum.each(held, &Native.instance_unhold/1)

  defp move_state(old, component, opts, olds, news) do
    snapshot = "#{@lifecycle}#snapshot"
    restore = "#{@lifecycle}#restore"

    # The rehearsal, on copies: nothing here enters a serving instance.
    rehearsal =
      with {:ok, states} <-
             each_ok(olds, fn src ->
               with {:ok, copy} <- scratch(old.component, old.opts),
                    :ok <- copy_state(src, copy),
                    do: Capsid.Call.call_preserving(copy, snapshot, [])
             end),
           {:ok, seeds} <- seeds(states, length(news), opts) do
        each_ok(seeds, fn seed ->
          with {:ok, copy} <- scratch(component, opts),
               do: Capsid.Call.call_preserving(copy, restore, [seed])
        end)
      end

    # The real handoff: every old member's snapshot, then every restore.
    with {:ok, _} <- rehearsal,
         {:ok, states} <- live_snapshots(olds, snapshot, restore),
         {:ok, seeds} <- seeds(states, length(news), opts) |> put_back(olds, states, restore),
         {:ok, _} <-
           Enum.zip(news, seeds)
           |> each_ok(fn {new, seed} -> Capsid.call(new, restore, [seed]) end)
           |> put_back(olds, states, restore) do
      :ok
    end
  end

  # Snapshots of the serving members, in order. If one fails, those taken
  # already are put back.
  defp live_snapshots(olds, snapshot, restore) do
    Enum.reduce_while(olds, {:ok, []}, fn src, {:ok, acc} ->
      case Capsid.Call.call_preserving(src, snapshot, []) do
        {:ok, state} ->
          {:cont, {:ok, [state | acc]}}

        {:error, _} = error ->
          taken = Enum.reverse(acc)

          Logger.warning(
            "Capsid: a snapshot failed on a serving instance but not on its copy; " <>
              "it recycled with the memories it had before (its globals and tables start afresh)"
          )

          {:halt, put_back(error, Enum.take(olds, length(taken)), taken, restore)}
      end
    end)
    |> case do
      {:ok, states} -> {:ok, Enum.reverse(states)}
      error -> error
    end
  end

  # After a handoff failed past the live snapshots, each old member gets its
  # own state back through its own `restore` (the snapshot may have moved it
  # out). The error is returned as it was.
  defp put_back({:ok, _} = ok, _olds, _states, _restore), do: ok

  defp put_back({:error, _} = error, olds, states, restore) do
    for {src, state} <- Enum.zip(olds, states) do
      case Capsid.Call.call_preserving(src, restore, [state]) do
        {:ok, _} ->
          Logger.warning(
            "Capsid: an upgrade failed after the serving instances' snapshots; " <>
              "their state was put back with the running version's restore"
          )

        {:error, e} ->
          Logger.error(
            "Capsid: an upgrade failed after a serving instance's snapshot, and putting " <>
              "its state back failed too: #{Exception.message(e)}"
          )
      end
    end

    error
  end

  # The state of each new member, from the old members' snapshots.
  defp seeds(states, n, opts) do
    case Keyword.get(opts, :merge) do
      nil ->
        {:ok, Enum.map(0..(n - 1), &Enum.at(states, rem(&1, length(states))))}

      merge ->
        try do
          merge.(states)
        rescue
          e -> {:error, Error.new(:bad_argument, "merge: raised #{Exception.message(e)}")}
        catch
          kind, reason ->
            {:error, Error.new(:bad_argument, "merge: #{kind}: #{inspect(reason, limit: 20)}")}
        else
          seeds when is_list(seeds) and length(seeds) == n ->
            if Enum.all?(seeds, &is_binary/1),
              do: {:ok, seeds},
              else: {:error, merge_error(n, seeds)}

          other ->
            {:error, merge_error(n, other)}
        end
    end
  end

  defp merge_error(n, got) do
    Error.new(
      :bad_argument,
      "merge: expected a list of #{n} binaries (one state per new member), got " <>
        inspect(got, limit: 10, printable_limit: 64)
    )
  end

  # A scratch instance of `component` for the rehearsal: the version's
  # imports and limits, no WASI output, owned by no process.
  defp scratch(component, opts) do
    opts =
      opts
      |> Keyword.take(@instance_keys)
      |> Keyword.update(:wasi, [], &Keyword.drop(&1, [:stdout, :stderr]))
      |> Keyword.put(:component, component)

    case Instance.create(opts) do
      {:ok, %{ref: ref}} -> {:ok, ref}
      {:error, _} = error -> error
    end
  rescue
    e in ArgumentError -> {:error, Error.new(:link, Exception.message(e))}
  end

  defp copy_state(src, copy) do
    case Native.instance_copy_state(src, copy) do
      :ok -> :ok
      {:error, {kind, message}} -> {:error, Error.new(kind, message)}
    end
  end

  defp each_ok(list, fun) do
    Enum.reduce_while(list, {:ok, []}, fn x, {:ok, acc} ->
      case fun.(x) do
        {:ok, v} -> {:cont, {:ok, [v | acc]}}
        {:error, _} = error -> {:halt, error}
      end
    end)
    |> case do
      {:ok, acc} -> {:ok, Enum.reverse(acc)}
      error -> error
    end
  end

  # A pool's resources; a pool that died meanwhile fails the upgrade (and
  # the new pool `pending` is stopped), it does not crash the deployment.
  defp refs(pid, pending) do
    {:ok, Pool.refs(pid)}
  catch
    :exit, reason ->
      stop_pool(pending.pid)

      {:error,
       Error.new(
         :instance_down,
         "a pool stopped during the upgrade (#{inspect(reason)}); the running version keeps serving"
       )}
  end

  # A version's pool, linked to this process, with its members' resources.
  defp start_pool(component, opts) do
    pool_opts =
      opts
      |> Keyword.take([:size | @instance_keys])
      |> Keyword.put(:component, component)

    case Pool.start_link(pool_opts) do
      {:ok, pid} ->
        {ref, _members} = Pool.refs(pid)
        {:ok, %{pid: pid, ref: ref}}

      {:error, error} ->
        {:error, unwrap(error)}
    end
  rescue
    # Options the caller checked may still not fit: the running version's
    # imports against a new version's, or a function that a module of
    # this node does not export (a cluster-wide deploy). Never a crash of
    # the deployment.
    e in ArgumentError -> {:error, Error.new(:link, Exception.message(e))}
  end

  defp stop_pool(pid) do
    GenServer.stop(pid, :shutdown)
  catch
    :exit, _ -> :ok
  end

  defp version(component, pool, source, number, opts) do
    %{
      component: component,
      pool: pool,
      opts: Keyword.drop(opts, @handoff_keys),
      source: if(is_binary(source) and not String.starts_with?(source, "\0asm"), do: source),
      number: number,
      loaded_at: DateTime.utc_now()
    }
  end

  defp versions(state) do
    describe = fn
      nil ->
        nil

      v ->
        %{
          version: v.number,
          hash: v.component.hash,
          guard_pages: Map.get(v.component, :guard_pages, false),
          fuel_metering: Map.get(v.component, :fuel_metering, true),
          loaded_at: v.loaded_at,
          source: v.source
        }
    end

    %{
      name: state.name,
      current: describe.(state.current) |> Map.put(:cache, state.current.component.cache),
      previous: describe.(state.previous),
      watch: state.watch && Map.take(state.watch, [:path, :interval, :last_error])
    }
  end
end
