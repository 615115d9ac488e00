defmodule Capsid.Budget do
  @moduledoc """
  Node budgets: what all instances on the node share, bounded node-wide.

  Each instance has its own limits (`Capsid.Limits`), but many instances
  within theirs can still add up to more than the node has. These budgets
  bound the sum over every instance of the node:

  | budget | counts | default | config key |
  |---|---|---|---|
  | `:memory` | bytes of linear memory and tables of all live instances | the machine's physical memory | `:max_memory_total` |
  | `:descriptors` | OS descriptors held for guests: files and directories they opened through WASI, preopens (one per instance that uses WASI), outbound HTTP connections | half of the process's `RLIMIT_NOFILE` | `:max_descriptors_total` |
  | `:host_bytes` | bytes of Elixir terms the host keeps as guests' host resource state | a quarter of physical memory | `:max_host_bytes_total` |

  Set them in the application environment (`config :capsid,
  max_descriptors_total: 2_000`), or at run time with `configure/1`.
  Whatever is configured, 64 descriptors below `RLIMIT_NOFILE` are never
  given to guests: the VM's own files, sockets and code loading always have
  them, so no guest can make the VM fail to open a file.

  What a guest meets past a budget:

    * memory: the growth (or instantiation) fails the call with
      `{:error, %Capsid.Error{kind: :resource_limit}}`, the message naming
      `:max_memory_total`; the instance starts afresh at its next call;
    * descriptors: a WASI error, as past the instance's own
      `:max_descriptors` (`insufficient-memory` from `open-at`,
      `connection-limit-reached` from an HTTP request); the call goes on;
    * host bytes: `{:error, %Capsid.Error{kind: :resource_limit}}`.

  Each time a call meets a budget (or its instance's `:max_descriptors`),
  this process emits the telemetry event `[:capsid, :resource_limit]`
  (measurements `%{in_use: n, limit: n}` of the node budget; metadata
  `%{resource: :memory | :descriptors | :host_bytes, instance: pid | nil,
  caller: pid}`) and logs a warning, at most one per budget every 10
  seconds.

      iex> %{descriptors: %{limit: limit, in_use: _, refused: _}} = Capsid.Budget.info()
      iex> limit > 0
      true
  """
  use GenServer
  require Logger

  @keys [:max_memory_total, :max_descriptors_total, :max_host_bytes_total]
  @log_every_ms 10_000

  @typedoc "A budget's state: what is in use now, its ceiling, and how many refusals so far."
  @type usage :: %{in_use: non_neg_integer(), limit: non_neg_integer(), refused: non_neg_integer()}

  @doc false
  def start_link(opts), do: GenServer.start_link(__MODULE__, opts, name: __MODULE__)

  @doc """
  Each budget's use: `%{memory: usage, descriptors: usage, host_bytes: usage}`.
  """
  @spec info() :: %{memory: usage(), descriptors: usage(), host_bytes: usage()}
  def info, do: Capsid.Native.node_info().budgets

  @doc """
  Sets node budgets at run time: `:max_memory_total`,
  `:max_descriptors_total`, `:max_host_bytes_total` (a non-negative
  integer, or `:default`). Lowering one below what is in use takes nothing
  back: it refuses until enough has been given back.

      iex> Capsid.Budget.configure(max_host_bytes_total: 1_073_741_824)
      :ok
      iex> Capsid.Budget.info().host_bytes.limit
      1073741824
      iex> Capsid.Budget.configure(max_host_bytes_total: :default)
      :ok
      iex> Capsid.Budget.configure(max_files: 3)
      ** (ArgumentError) unknown node budget :max_files: expected one of :max_memory_total, :max_descriptors_total, :max_host_bytes_total
  """
  @spec configure(keyword()) :: :ok
  def configure(settings) do
    unless Keyword.keyword?(settings) do
      raise ArgumentError, "expected a keyword list of node budgets, got #{inspect(settings)}"
    end

    settings
    |> Enum.map(fn
      {key, value} when key in @keys -> {Atom.to_string(key), value!(key, value)}
      {key, _} -> raise ArgumentError, "unknown node budget #{inspect(key)}: #{expected()}"
    end)
    |> native_configure()
  end

  @doc false
  # At application start: the budgets and the address-space limit from the
  # application environment.
  def configure_from_env do
    budgets = for key <- @keys, do: {Atom.to_string(key), env_value(key)}

    address_space =
      case Application.get_env(:capsid, :address_space_limit) do
        nil -> []
        limit -> [{"address_space_limit", value!(:address_space_limit, limit)}]
      end

    # Capsid's large conversions leave one dirty CPU scheduler to the VM
    # (it collects large heaps there): see `Capsid.Call.dirty/1`.
    dirty = max(1, :erlang.system_info(:dirty_cpu_schedulers_online) - 1)

    native_configure(address_space ++ budgets ++ [{"dirty_conversions", dirty}])
  end

  defp env_value(key), do: value!(key, Application.get_env(:capsid, key, :default))

  defp native_configure(settings) do
    case Capsid.Native.node_configure(settings) do
      {:ok, :ok} -> :ok
      {:error, message} -> raise ArgumentError, message
    end
  end

  defp value!(_key, :default), do: nil
  defp value!(_key, n) when is_integer(n) and n >= 0 and n <= 0xFFFF_FFFF_FFFF_FFFF, do: n

  defp value!(key, other) do
    raise ArgumentError,
          "invalid value for #{inspect(key)}: expected a non-negative integer or :default, " <>
            "got #{inspect(other)}"
  end

  defp expected,
    do: "expected one of #{Enum.map_join(@keys, ", ", &inspect/1)}"

  @impl true
  def init(_opts), do: {:ok, %{logged: %{}}}

  @impl true
  def handle_info({:capsid_resource_limit, resource, instance, caller, in_use, limit}, state) do
    Capsid.Telemetry.execute(
      [:capsid, :resource_limit],
      %{in_use: in_use, limit: limit},
      %{resource: resource, instance: instance, caller: caller}
    )

    now = System.monotonic_time(:millisecond)

    case state.logged do
      %{^resource => at} when now - at < @log_every_ms ->
        {:noreply, state}

      _ ->
        Logger.warning(
          "Capsid: a guest met the node's #{resource} budget or its instance's share of it " <>
            "(instance #{inspect(instance)}, #{in_use} of #{limit} in use on the node); " <>
            "see Capsid.Budget"
        )

        {:noreply, put_in(state.logged[resource], now)}
    end
  end

  def handle_info(_other, state), do: {:noreply, state}
end
