defmodule Capsid.Registry do
  @moduledoc false
  # Where calls find their targets (mirrors host_nif/src/registry.rs): pids
  # and names of instances and pools, and deployment names, live in the NIF,
  # so that a call needs no message and no lookup in Elixir, and so that
  # starting or stopping an instance costs no VM-wide operation (no
  # `persistent_term` erase). The NIF monitors each owner process and drops
  # its entries however it dies.
  #
  # This process owns one ETS table: the versions of each deployment, so
  # that a deployment restarted after a crash comes back on the version it
  # was serving.

  use GenServer

  alias Capsid.Native

  @deployments :capsid_deployments

  def start_link(_), do: GenServer.start_link(__MODULE__, nil, name: __MODULE__)

  @doc false
  # Registers the calling process as the owner of `target` (an instance or
  # pool resource), under `name` too unless nil: an atom, `{:global, term}`
  # or `{:via, module, term}`, as for `GenServer`.
  def register(target, name) do
    fast = if is_atom(name), do: name, else: nil

    case Native.registry_register(target, self(), fast) do
      :ok ->
        case register_name(name) do
          :ok ->
            :ok

          {:error, _} = error ->
            Native.registry_unregister(self())
            error
        end

      {:error, :already_registered} ->
        {:error, {:already_started, GenServer.whereis(name)}}

      {:error, reason} ->
        {:error, reason}
    end
  end

  defp register_name(nil), do: :ok

  defp register_name(name) when is_atom(name) do
    Process.register(self(), name)
    :ok
  rescue
    ArgumentError -> {:error, {:already_started, Process.whereis(name)}}
  end

  defp register_name({:global, term}) do
    case :global.register_name(term, self()) do
      :yes -> :ok
      :no -> {:error, {:already_started, :global.whereis_name(term)}}
    end
  end

  defp register_name({:via, module, term}) do
    case module.register_name(term, self()) do
      :yes -> :ok
      :no -> {:error, {:already_started, module.whereis_name(term)}}
    end
  end

  defp register_name(other) do
    raise ArgumentError,
          "invalid value for :name: expected an atom, {:global, term} or {:via, module, term}, got #{inspect(other)}"
  end

  @doc false
  # The calling process stops owning its target: calls to it are refused
  # from now on (calls already running finish).
  def unregister, do: Native.registry_unregister(self())

  @doc false
  # Points a deployment name at a pool (nil: removes it). One atomic write.
  def put_name(name, pool), do: Native.registry_put_name(name, pool)

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
  # A compiled component with this SHA-256, compiled for the engine
  # `{guard_pages, fuel_metering}` names (`Capsid.Component.flavor!/1`),
  # that some deployment keeps (current or previous version), or nil. Only
  # the match is copied out.
  def component(hash, {guard_pages, fuel_metering}) do
    spec =
      for key <- [:current, :previous] do
        {{:_, %{key => %{component: :"$1"}}},
         [
           {:andalso, {:==, {:map_get, :hash, :"$1"}, hash},
            {:andalso, {:==, {:map_get, :guard_pages, :"$1"}, guard_pages},
             {:==, {:map_get, :fuel_metering, :"$1"}, fuel_metering}}}
         ], [:"$1"]}
      end

    case :ets.select(@deployments, spec, 1) do
      {[component | _], _} -> component
      :"$end_of_table" -> nil
    end
  end

  @doc false
  def forget_deployment(name), do: :ets.delete(@deployments, name)

  @impl true
  def init(nil) do
    :ets.new(@deployments, [:named_table, :public, :set])
    {:ok, nil}
  end
end
