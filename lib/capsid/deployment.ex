defmodule Capsid.Deployment do
  @moduledoc """
  A named, supervised set of instances of one component version, upgraded
  in place, BEAM-style. Use it through `Capsid.deploy/3`, `Capsid.call/4`
  (with the deployment's name), `Capsid.versions/1`, `Capsid.rollback/1` and
  `Capsid.undeploy/1`.

  ## An upgrade

  1. The new version is compiled (through the code cache) in the caller.
  2. Unless `force: true`, it must keep every function the current version
     exports, with the same WIT type; `capsid:host/lifecycle` is the host's
     own protocol and is not part of this check.
  3. Its instances are started (linked, instantiated): a link error or a
     trap here leaves the current version serving.
  4. If both versions export `capsid:host/lifecycle`, each new instance is
     seeded with `restore(snapshot())` of an old one. A failing restore
     aborts the upgrade; the current version keeps serving.
  5. The switch: one atomic write of the name → instances entry. Every call
     that starts afterwards runs on the new version; the old instances are
     retired (a call that had picked one before the switch is turned away
     and retried on the new version, never failed), and stop once the calls
     already running on them have finished.

  The previous version's compiled component stays in memory for
  `Capsid.rollback/1`, which swaps back the same way.

  Each deployment is a process under Capsid's own supervisor. If it crashes,
  it is restarted on the version it was serving (with its previous version
  still available for rollback), not on the one it was first deployed with.

  State is snapshotted while the old version still serves: a call that
  completes between the snapshot and the switch is not reflected in the new
  version's state.
  """

  use GenServer
  require Logger

  alias Capsid.{Component, Error, Instance, Native, Registry, Telemetry}

  @lifecycle "capsid:host/lifecycle@0.1.0"

  @deploy_keys [
                 :size,
                 :force,
                 :watch,
                 :watch_interval,
                 :cache,
                 :imports,
                 :max_queue,
                 :queue_timeout
               ] ++
                 Capsid.Limits.keys()

  @doc false
  def child_spec({name, _, _, _} = arg) do
    # Shutdown stops every member in turn, each finishing its running call.
    %{
      id: {__MODULE__, name},
      start: {__MODULE__, :start_link, [arg]},
      restart: :transient,
      shutdown: 30_000
    }
  end

  @doc false
  def start_link({name, _component, _source, _opts} = arg) do
    GenServer.start_link(__MODULE__, arg, name: via(name))
  end

  defp via(name), do: {:via, Elixir.Registry, {Capsid.Deployments, name}}

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

    unless is_atom(name) and name not in [nil, true, false] do
      raise ArgumentError, "a deployment name must be an atom, got #{inspect(name)}"
    end

    if Keyword.get(opts, :watch, false) and match?(<<"\0asm", _::binary>>, source) do
      raise ArgumentError, "watch: true needs a file path to watch, not the component's bytes"
    end

    t0 = System.monotonic_time()

    with {:ok, component} <- Component.load(source, cache: Keyword.get(opts, :cache, true)) do
      result =
        case whereis(name) do
          nil ->
            case DynamicSupervisor.start_child(
                   Capsid.DeploymentSupervisor,
                   {__MODULE__, {name, component, source, opts}}
                 ) do
              {:ok, pid} -> GenServer.call(pid, :versions)
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

  defp unwrap(%{__exception__: true} = e), do: e
  defp unwrap({%{__exception__: true} = e, _stack}), do: e
  defp unwrap(other), do: Error.new(:internal, "deployment failed to start: #{inspect(other)}")

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
      nil -> {:error, Error.new(:instance_down, "no deployment named #{inspect(name)}")}
      pid -> DynamicSupervisor.terminate_child(Capsid.DeploymentSupervisor, pid)
    end
  end

  ## Compatibility

  @doc false
  # Every function `old` exports must exist in `new` with the same type.
  def incompatibilities(%Component{} = old, %Component{} = new) do
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
  def init({name, component, source, opts}) do
    Process.flag(:trap_exit, true)

    state = %{
      name: name,
      opts: opts,
      current: nil,
      previous: nil,
      number: 0,
      retiring: %{},
      watch: nil
    }

    # After a crash, the supervisor restarts us with the arguments of the
    # first deploy: come back on the version that was serving instead.
    {component, source, opts, number, previous} =
      case Registry.recall_deployment(name) do
        %{current: c, previous: p, opts: o} -> {c.component, c.source, o, c.number, p}
        nil -> {component, source, opts, 1, nil}
      end

    case start_members(component, opts) do
      {:ok, members} ->
        version = version(component, members, source, number)
        Registry.register_deployment(name, members)
        state = %{state | opts: opts, current: version, previous: previous, number: number}
        {:ok, state |> remember() |> maybe_watch()}

      {:error, error} ->
        {:stop, error}
    end
  end

  defp remember(state) do
    Registry.remember_deployment(state.name, %{
      current: %{state.current | members: []},
      previous: state.previous,
      opts: state.opts
    })

    state
  end

  @impl true
  def handle_call(:versions, _from, state), do: {:reply, {:ok, versions(state)}, state}

  def handle_call({:upgrade, component, source, opts}, _from, state) do
    opts = Keyword.merge(state.opts, opts)

    case swap(state, component, source, opts, Keyword.get(opts, :force, false), :swap) do
      {:ok, state} -> {:reply, {:ok, versions(state)}, state}
      {:error, error} -> {:reply, {:error, error}, state}
    end
  end

  def handle_call(:rollback, _from, %{previous: nil} = state) do
    {:reply,
     {:error,
      Error.new(:unknown_function, "#{inspect(state.name)} has no previous version to roll back to")},
     state}
  end

  def handle_call(:rollback, _from, %{previous: prev} = state) do
    case swap(state, prev.component, prev.source, state.opts, true, :rollback) do
      {:ok, state} -> {:reply, {:ok, versions(state)}, state}
      {:error, error} -> {:reply, {:error, error}, state}
    end
  end

  @impl true
  def handle_info({:EXIT, pid, reason}, state) do
    cond do
      pid in state.current.members ->
        # A current member crashed: replace it with the same version.
        {:ok, [new]} = start_members(state.current.component, Keyword.put(state.opts, :size, 1))
        members = Enum.map(state.current.members, &if(&1 == pid, do: new, else: &1))
        Registry.register_deployment(state.name, members)
        {:noreply, put_in(state.current.members, members)}

      true ->
        # A retired member that stopped (or exited on its own while
        # draining). The parent's exit never gets here: gen_server handles it.
        _ = reason
        {:noreply, %{state | retiring: Map.delete(state.retiring, pid)}}
    end
  end

  def handle_info(:drain, state) do
    # Stop retired instances whose last call has finished.
    retiring =
      Enum.reduce(state.retiring, state.retiring, fn {pid, ref}, acc ->
        if Native.instance_idle(ref) do
          stop_member(pid)
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
      with {:ok, bytes} <- File.read(watch.path),
           hash = :crypto.hash(:sha256, bytes) |> Base.encode16(case: :lower),
           true <- hash not in [state.current.component.hash, watch.failed] do
        reload(state, bytes, hash)
      else
        _ -> state
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

    Registry.unregister_deployment(state.name)
    Enum.each(state.current.members ++ Map.keys(state.retiring), &stop_member/1)
    :ok
  end

  defp reload(state, bytes, hash) do
    path = state.watch.path
    force = Keyword.get(state.opts, :force, false)

    with {:ok, component} <- Component.load(bytes, cache: Keyword.get(state.opts, :cache, true)),
         {:ok, new_state} <- swap(state, component, path, state.opts, force, :swap) do
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
    old = state.current
    t0 = System.monotonic_time()

    with :ok <- check(old.component, component, force),
         {:ok, members} <- start_members(component, opts),
         :ok <- hand_over(old, component, members) do
      Registry.register_deployment(state.name, members)

      # After the switch nobody new can pick an old member; the ones that
      # already did are turned away by the retire flag and retry.
      retiring =
        for pid <- old.members, into: state.retiring do
          {:ok, ref, _, _} = Registry.lookup(pid)
          Native.instance_retire(ref)
          {pid, ref}
        end

      send(self(), :drain)
      number = state.number + 1

      Telemetry.execute(
        [:capsid, :deploy, event],
        %{duration: System.monotonic_time() - t0},
        %{name: state.name, old_hash: old.component.hash, new_hash: component.hash}
      )

      state = %{
        state
        | current: version(component, members, source, number),
          previous: %{old | members: []},
          number: number,
          retiring: retiring
      }

      {:ok, remember(state)}
    end
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

  defp hand_over(old, component, members) do
    if lifecycle?(old.component) and lifecycle?(component) do
      old_members = List.to_tuple(old.members)

      members
      |> Enum.with_index()
      |> Enum.reduce_while(:ok, fn {new, i}, :ok ->
        source = elem(old_members, rem(i, tuple_size(old_members)))

        with {:ok, state} <- Capsid.call(source, "#{@lifecycle}#snapshot", []),
             {:ok, nil} <- Capsid.call(new, "#{@lifecycle}#restore", [state]) do
          {:cont, :ok}
        else
          {:error, error} ->
            Enum.each(members, &stop_member/1)

            {:halt,
             {:error,
              Error.new(
                :link,
                "state handoff failed, the running version keeps serving: #{Exception.message(error)}"
              )}}
        end
      end)
    else
      :ok
    end
  end

  defp start_members(component, opts) do
    size = Keyword.get(opts, :size, System.schedulers_online())

    instance_opts =
      opts
      |> Keyword.drop([:size, :force, :watch, :watch_interval, :cache])
      |> Keyword.put(:component, component)

    Enum.reduce_while(1..size, {:ok, []}, fn _, {:ok, acc} ->
      case Instance.start_link(instance_opts) do
        {:ok, pid} ->
          {:cont, {:ok, [pid | acc]}}

        {:error, error} ->
          Enum.each(acc, &stop_member/1)
          {:halt, {:error, error}}
      end
    end)
    |> case do
      {:ok, members} -> {:ok, Enum.reverse(members)}
      error -> error
    end
  end

  defp stop_member(pid) do
    GenServer.stop(pid, :shutdown)
  catch
    :exit, _ -> :ok
  end

  defp version(component, members, source, number) do
    %{
      component: component,
      members: members,
      source: if(is_binary(source) and not String.starts_with?(source, "\0asm"), do: source),
      number: number,
      loaded_at: DateTime.utc_now()
    }
  end

  defp versions(state) do
    describe = fn
      nil -> nil
      v -> %{version: v.number, hash: v.component.hash, loaded_at: v.loaded_at, source: v.source}
    end

    %{
      name: state.name,
      current: describe.(state.current) |> Map.put(:cache, state.current.component.cache),
      previous: describe.(state.previous),
      watch: state.watch && Map.take(state.watch, [:path, :interval, :last_error])
    }
  end
end
