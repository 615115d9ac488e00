defmodule Capsid.Limits do
  @moduledoc """
  Sandbox limits. Every instance has all of them, with safe finite defaults;
  `Capsid.call/4` may narrow `:fuel`, `:timeout` and `:max_memory` for one
  call, never raise them.

  | option                | default       | meaning                                        |
  |-----------------------|---------------|------------------------------------------------|
  | `:fuel`               | 10_000_000_000 | wasm instructions per call (0.5–5 s of work)  |
  | `:timeout`            | 5_000         | wall-clock milliseconds per call               |
  | `:max_memory`         | 256 MiB       | bytes of linear memory, all memories summed    |
  | `:max_table_elements` | 100_000       | elements per table                             |
  | `:max_instances`      | 100           | core instances a component may create          |
  | `:max_tables`         | 100           | tables a component may create                  |
  | `:max_memories`       | 100           | memories a component may create                |

  `:fuel` and `:timeout` also accept `:infinity` (use it for one of them
  only: a call must stay bounded by something).
  """

  @u64_max 0xFFFF_FFFF_FFFF_FFFF

  @defaults [
    fuel: 10_000_000_000,
    timeout: 5_000,
    max_memory: 256 * 1024 * 1024,
    max_table_elements: 100_000,
    max_instances: 100,
    max_tables: 100,
    max_memories: 100
  ]

  @keys Keyword.keys(@defaults)
  @per_call [:fuel, :timeout, :max_memory]

  @type t :: %{
          fuel: non_neg_integer(),
          timeout: non_neg_integer(),
          max_memory: non_neg_integer(),
          max_table_elements: non_neg_integer(),
          max_instances: non_neg_integer(),
          max_tables: non_neg_integer(),
          max_memories: non_neg_integer()
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
      iex> Capsid.Limits.new(fuel: -1)
      ** (ArgumentError) invalid value for :fuel: expected a non-negative integer or :infinity, got -1
  """
  @spec new(keyword()) :: t()
  def new(opts) do
    Map.new(@keys, fn key -> {key, value!(key, Keyword.get(opts, key, @defaults[key]))} end)
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
  defp value!(_key, v) when is_integer(v) and v >= 0 and v <= @u64_max, do: v

  defp value!(key, v) do
    expected =
      if key in [:fuel, :timeout],
        do: "a non-negative integer or :infinity",
        else: "a non-negative integer"

    raise ArgumentError,
          "invalid value for #{inspect(key)}: expected #{expected}, got #{inspect(v)}"
  end
end
