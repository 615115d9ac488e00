defmodule Capsid.Registry do
  @moduledoc false
  # Maps live instance pids to their native resource, so a call needs no
  # message round trip to find its instance.
  #
  # The hot entry (pid → resource, id, timeouts) is a persistent term: reading
  # it costs ~30 ns against ~150 ns for ETS, and it is read on every call.
  # The price is paid when an instance stops (erasing a persistent term makes
  # the VM scan processes for references to it), which is rare next to calls.
  # Imports (Elixir funs, read only when a guest calls one) live in ETS.
  #
  # The server owns the ETS table and removes the entries of instances that
  # die, however they die.

  use GenServer

  @table :capsid_instances
  # name → the deployment's current and previous versions, so that a
  # deployment process restarted after a crash comes back on the version it
  # was serving, not the one it was first deployed with.
  @deployments :capsid_deployments

  def start_link(_), do: GenServer.start_link(__MODULE__, nil, name: __MODULE__)

  @doc false
  def register(pid, ref, id, timeouts, imports) do
    :ets.insert(@table, {pid, imports})
    :persistent_term.put({__MODULE__, pid}, {ref, id, timeouts})
    GenServer.cast(__MODULE__, {:watch, pid})
  end

  @doc false
  # A pool: calls to `pid` go to one of `members`. Each member is stored with
  # its resource, so a pool call reads one persistent term, not two.
  def register_pool(pid, members) do
    :persistent_term.put({__MODULE__, pid}, {:pool, entries(members)})
  end

  @doc false
  # A deployment: calls to `name` go to one of `members`. Swapping versions
  # is one put: atomic for every reader.
  def register_deployment(name, members) do
    :persistent_term.put({__MODULE__, {:deployment, name}}, {:pool, entries(members)})
  end

  # `{pid, ref, id, timeouts}` per member; a member that is already gone is
  # `{pid, nil, nil, nil}`, which callers treat like a retired one.
  defp entries(members) do
    members
    |> Enum.map(fn pid ->
      case lookup(pid) do
        {:ok, ref, id, timeouts} -> {pid, ref, id, timeouts}
        _ -> {pid, nil, nil, nil}
      end
    end)
    |> List.to_tuple()
  end

  @doc false
  def unregister_deployment(name), do: :persistent_term.erase({__MODULE__, {:deployment, name}})

  @doc false
  def lookup_deployment(name) do
    :persistent_term.get({__MODULE__, {:deployment, name}}, nil)
  end

  @doc false
  def remember_deployment(name, versions), do: :ets.insert(@deployments, {name, versions})

  @doc false
  def recall_deployment(name) do
    case :ets.lookup(@deployments, name) do
      [{_, versions}] -> versions
      [] -> nil
    end
  end

  @doc false
  def forget_deployment(name), do: :ets.delete(@deployments, name)

  @doc false
  def unregister(pid) do
    :ets.delete(@table, pid)
    :persistent_term.erase({__MODULE__, pid})
  end

  @doc false
  def lookup(pid) do
    case :persistent_term.get({__MODULE__, pid}, nil) do
      {:pool, _} = pool -> pool
      {ref, id, timeouts} -> {:ok, ref, id, timeouts}
      nil -> :error
    end
  end

  @doc false
  def imports(pid) do
    case :ets.lookup(@table, pid) do
      [{_, imports}] -> imports
      [] -> %{}
    end
  end

  @impl true
  def init(nil) do
    :ets.new(@table, [:named_table, :public, :set, read_concurrency: true])
    :ets.new(@deployments, [:named_table, :public, :set])
    {:ok, nil}
  end

  @impl true
  def handle_cast({:watch, pid}, state) do
    Process.monitor(pid)
    {:noreply, state}
  end

  @impl true
  def handle_info({:DOWN, _, :process, pid, _}, state) do
    unregister(pid)
    {:noreply, state}
  end
end
