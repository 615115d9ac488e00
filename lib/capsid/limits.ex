defmodule Capsid.Limits do
  @moduledoc """
  Sandbox limits. Every instance has all of them, with safe finite defaults;
  `Capsid.call/4` may narrow `:fuel`, `:timeout` and `:max_memory` for one
  call, never raise them.

  | option                | default          | meaning                                     |
  |-----------------------|------------------|---------------------------------------------|
  | `:timeout`            | 5_000            | wall-clock milliseconds per call            |
  | `:fuel`               | 10^8 × timeout   | wasm instructions per call: a backstop      |
  | `:max_memory`         | 256 MiB          | bytes of linear memory and tables, summed   |
  | `:max_table_elements` | 100_000          | elements per table                          |
  | `:max_instances`      | 64               | core instances a component may create       |
  | `:max_tables`         | 32               | tables a component may create               |
  | `:max_memories`       | 8                | memories a component may create             |
  | `:max_handles`        | 10_000           | resource handles alive in an instance       |
  | `:max_descriptors`    | 256              | OS descriptors held for the guest: files and directories it opened, preopens, outbound HTTP connections |
  | `:max_host_bytes`     | 64 MiB           | bytes of Elixir terms the host keeps as the state of the guest's host resources |

  The timeout is the usual stop. Fuel defaults to a backstop derived from
  the timeout: 100 million units per millisecond, about five times what the
  fastest guest loop measured here burns, so that fuel never runs out before
  the timeout of a call that is still within it (and raising `:timeout`
  raises it too). With `timeout: :infinity` the default fuel is 10^13
  (about ten minutes of a tight loop).

  `:fuel` and `:timeout` also accept `:infinity` (use it for one of them
  only: a call must stay bounded by something). Tables count against
  `:max_memory` at 8 bytes per element. A component loaded with
  `fuel_metering: false` (`Capsid.Component.load/2`) has no fuel: its
  timeout is its only bound, so a `:fuel` limit and `timeout: :infinity`
  are refused for it.

  A guest past `:max_descriptors` sees a WASI error (`insufficient-memory`
  when opening a file, `connection-limit-reached` for an HTTP request; a
  preopen it gets no descriptor for is not there); past `:max_host_bytes`
  its call traps with `:memory_limit`. What all instances of the node share
  (memory, descriptors, host-held terms) has node-wide budgets on top of
  these: see `Capsid.Budget`.
  """

  import Capsid.Options, only: [is_u64: 1]

  @u64_max 0xFFFF_FFFF_FFFF_FFFF

  @defaults [
    fuel: :auto,
    timeout: 5_000,
    max_memory: 256 * 1024 * 1024,
    max_table_elements: 100_000,
    max_instances: 64,
    max_tables: 32,
    max_memories: 8,
    max_handles: 10_000,
    max_descriptors: 256,
    max_host_bytes: 64 * 1024 * 1024
  ]

  # Fuel per millisecond of timeout for the default fuel.
  @fuel_per_ms 100_000_000
  @fuel_without_timeout 10_000_000_000_000

  @keys Keyword.keys(@defaults)
  @per_call [:fuel, :timeout, :max_memory]

  @type t :: %{
          fuel: non_neg_integer(),
          timeout: non_neg_integer(),
          max_memory: non_neg_integer(),
          max_table_elements: non_neg_integer(),
          max_instances: non_neg_integer(),
          max_tables: non_neg_integer(),
          max_memories: non_neg_integer(),
          max_handles: non_neg_integer(),
          max_descriptors: non_neg_integer(),
          max_host_bytes: non_neg_integer()
        }

  @doc """
  The default limits.

      iex> Capsid.Limits.defaults()[:timeout]
      5000
  """
  @spec defaults() :: keyword()
  def defaults, do: @defaults

  @doc false
  def keys, do: @keys

  @doc false
  def per_call_keys, do: @per_call

  @doc """
  Builds the full limits map from options (other keys are ignored), raising
  `ArgumentError` for a bad value.

      iex> Capsid.Limits.new(fuel: 10).fuel
      10
      iex> Capsid.Limits.new(timeout: 2_000).fuel
      200_000_000_000
      iex> Capsid.Limits.new(fuel: -1)
      ** (ArgumentError) invalid value for :fuel: expected a non-negative integer or :infinity, got -1
  """
  @spec new(keyword()) :: t()
  def new(opts) do
    limits =
      Map.new(@keys -- [:fuel], fn key ->
        {key, value!(key, Keyword.get(opts, key, @defaults[key]))}
      end)

    fuel =
      case Keyword.get(opts, :fuel, :auto) do
        :auto when limits.timeout == @u64_max -> @fuel_without_timeout
        :auto -> min(limits.timeout * @fuel_per_ms, @u64_max)
        fuel -> value!(:fuel, fuel)
      end

    Map.put(limits, :fuel, fuel)
  end

  @doc false
  # Per-call values as the NIF takes them: integers or nil (instance value).
  def call_values!(opts) do
    {opt(opts, :fuel), opt(opts, :timeout), opt(opts, :max_memory)}
  end

  defp opt(opts, key) do
    case Keyword.fetch(opts, key) do
      {:ok, v} -> value!(key, v)
      :error -> nil
    end
  end

  defp value!(key, :infinity) when key in [:fuel, :timeout], do: @u64_max
  defp value!(_key, v) when is_u64(v), do: v

  defp value!(key, v) do
    expected =
      if key in [:fuel, :timeout],
        do: "a non-negative integer or :infinity",
        else: "a non-negative integer"

    raise ArgumentError,
          "invalid value for #{inspect(key)}: expected #{expected}, got #{inspect(v)}"
  end
end
