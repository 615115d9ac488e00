defmodule Capsid.Registry do
  @moduledoc false
  # Maps live instance pids to their native resource in a public ETS table,
  # so a call needs no message round trip to find its instance. The server
  # only owns the table and removes entries of instances that die, however
  # they die.

  use GenServer

  @table :capsid_instances

  def start_link(_), do: GenServer.start_link(__MODULE__, nil, name: __MODULE__)

  @doc false
  def register(pid, ref, id, timeouts, imports) do
    :ets.insert(@table, [{pid, ref, id, timeouts}, {{:imports, pid}, imports}])
    GenServer.cast(__MODULE__, {:watch, pid})
  end

  @doc false
  def unregister(pid) do
    :ets.delete(@table, pid)
    :ets.delete(@table, {:imports, pid})
  end

  @doc false
  def lookup(pid) do
    case :ets.lookup(@table, pid) do
      [{^pid, ref, id, timeouts}] -> {:ok, ref, id, timeouts}
      [] -> :error
    end
  end

  @doc false
  def imports(pid) do
    case :ets.lookup(@table, {:imports, pid}) do
      [{_, imports}] -> imports
      [] -> %{}
    end
  end

  @impl true
  def init(nil) do
    :ets.new(@table, [:named_table, :public, :set, read_concurrency: true])
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
