defmodule Capsid.Options do
  @moduledoc false
  # Keyword options validated in one place: unknown keys are an
  # ArgumentError with a "did you mean" hint.

  @doc false
  # What the NIF takes as a u64 (sizes, limits, seeds).
  defguard is_u64(n) when is_integer(n) and n >= 0 and n <= 0xFFFF_FFFF_FFFF_FFFF

  @spec validate!(keyword(), [atom()], String.t()) :: keyword()
  def validate!(opts, known, where) do
    unless Keyword.keyword?(opts) do
      raise ArgumentError, "#{where} expects a keyword list of options, got: #{inspect(opts)}"
    end

    for {key, _} <- opts, key not in known do
      raise ArgumentError, "unknown option #{inspect(key)} for #{where}#{suggest(key, known)}"
    end

    opts
  end

  defp suggest(key, known) do
    name = Atom.to_string(key)

    known
    |> Enum.map(&{&1, String.jaro_distance(name, Atom.to_string(&1))})
    |> Enum.filter(fn {_, d} -> d > 0.75 end)
    |> Enum.max_by(fn {_, d} -> d end, fn -> nil end)
    |> case do
      nil -> ". Known options: #{Enum.map_join(known, ", ", &inspect/1)}"
      {best, _} -> ". Did you mean #{inspect(best)}?"
    end
  end
end
