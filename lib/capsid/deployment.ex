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
  4. If both versions export `capsid:host/lifecycle`, each new instance is
     seeded with `restore(snapshot())` of an old one. A failing snapshot or
     restore aborts the upgrade; the current version keeps serving.
  5. The switch: one atomic write of the name → pool entry. Every call that
     starts afterwards runs on the new version; the old pool is retired (a
     call that had picked one of its instances before the switch is turned
     away and retried on the new version, never failed), and stops once the
     calls already running on it have finished.

  The previous version's compiled component stays in memory for
  `Capsid.rollback/1`, which swaps back the same way.

  If a deployment process crashes, its supervisor restarts it on the
  version it was serving (with its previous version still available for
  rollback), not on the one it was first deployed with.

  State is snapshotted while the old version still serves: a call that
  completes between the snapshot and the switch is not reflected in the new
  version's state.
  """

  use GenServer
  require Logger

  alias Capsid.{Component, Error, Instance, Native, Pool, Registry, Telemetry}

  @lifecycle "capsid:host/lifecycle@0.1.0"

  @instance_keys [:imports, :strict_imports, :max_queue, :queue_timeout, :wasi] ++
                   Capsid.Limits.keys()
  # The options a deployment hands to `Capsid.Component.load/2`.
  @load_keys [:cache, :guard_pages, :fuel_metering]
  @deploy_keys [:size, :force, :watch, :watch_interval] ++ @load_keys ++ @instance_keys

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
    opts = Keyword.merge(state.opts, opts)

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
        {:ok, pool} ->
          pending = %{
            agent: agent,
            monitor: Process.monitor(agent),
            kind: kind,
            pool: pool,
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
        kind -> commit_swap(state, p.pool, p.component, p.source, p.opts, kind, p.t0)
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
         {:ok, pool} <- prepare_pool(state, component, opts) do
      {:ok, commit_swap(state, pool, component, source, opts, event, t0)}
    end
  end

  # The new version's pool, started and seeded with the running version's
  # state; nothing serves from it yet.
  defp prepare_pool(state, component, opts) do
    with {:ok, pool} <- start_pool(component, opts),
         :ok <- hand_over(state.current, component, pool),
         do: {:ok, pool}
  end

  defp commit_swap(state, pool, component, source, opts, event, t0) do
    old = state.current
    # An old pool that died since the preparation has no member to drain.
    old_members = old_members(old.pool.pid)
    # One atomic write: every call that starts afterwards goes to `pool`.
    Registry.put_name(state.name, pool.ref)
    # Calls that picked an old member before the switch are turned away
    # by the retire flag and retry on the new version.
    Native.pool_retire(old.pool.ref)
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

  # Seeds each new member with the state of an old one. Any failure (a
  # trap, an old member gone) aborts the upgrade and stops the new pool.
  defp hand_over(old, component, pool) do
    with true <- lifecycle?(old.component) and lifecycle?(component),
         {:ok, {_, olds}} <- refs(old.pool.pid, pool),
         {:ok, {_, news}} <- refs(pool.pid, pool) do
      olds = List.to_tuple(olds)

      news
      |> Enum.with_index()
      |> Enum.reduce_while(:ok, fn {new, i}, :ok ->
        source = elem(olds, rem(i, tuple_size(olds)))

        # A snapshot that traps must not cost the old instance its state.
        with {:ok, state} <- Capsid.Call.call_preserving(source, "#{@lifecycle}#snapshot", []),
             {:ok, nil} <- Capsid.call(new, "#{@lifecycle}#restore", [state]) do
          {:cont, :ok}
        else
          {:error, error} ->
            stop_pool(pool.pid)

            {:halt,
             {:error,
              Error.new(
                :link,
                "state handoff failed, the running version keeps serving: #{Exception.message(error)}"
              )}}
        end
      end)
    else
      false -> :ok
      {:error, _} = error -> error
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
      opts: opts,
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
