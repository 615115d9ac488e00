defmodule Capsid.Fuzz do
  @moduledoc """
  Property-based testing without a dependency: seedable generators of Elixir
  terms and of WIT values (valid ones, with what they must come back as, and
  garbage), and `check/4`, which runs a property over many generated cases.

  A generator is a function of a *size* (0..100) that draws from the calling
  process's `:rand` state. `check/4` seeds that state for every case from
  `{seed, property name, case number}`, so a seed reproduces a whole run, and a
  seed and a case number reproduce one case whatever the number of runs:

      CAPSID_FUZZ_SEED=1234 CAPSID_FUZZ_RUNS=20000 mix test test/capsid/fuzz_test.exs

  The seed defaults to ExUnit's (`mix test --seed N` reproduces it too). A
  failure names the seed, the case, its input, and the smallest failing input
  that a short search over smaller sizes finds.

  WIT types are written as `Capsid.Types` terms (`{:list, :u8}`,
  `{:record, [{"x", :f64}]}`, ...). Names are WIT's (kebab-case); values use
  snake_case atoms, as in calls.

  ## Valid values and their normal form

  `value/1` generates valid arguments of a WIT type, in every shape the call
  boundary accepts; `normalise/2` gives the result a round trip through an
  identity function must return:

    * f32: the value rounded to the nearest f32 (ties to even; past the
      largest f32 it rounds to `:infinity` / `:neg_infinity`, as IEEE 754 does);
    * f32, f64: an integer argument becomes a float (generated integers are
      exact in f32, so no second rounding is involved);
    * `:nan`, `:infinity`, `:neg_infinity` stay atoms; `-0.0` stays `-0.0`
      (`same?/2` compares floats bit for bit);
    * flags: the names present, in declaration order, without duplicates,
      whether given as a list (any order, duplicates) or a MapSet;
    * `list<u8>`: a binary, whether given as a binary or a list of bytes;
    * everything else: unchanged.

  ## Garbage

  `garbage/2` generates arguments that are wrong somewhere: a wrong type at a
  random depth, near misses (an integer one past its range, a surrogate
  `char`, invalid UTF-8, a record with a missing, extra or string key, an
  unknown case, a tuple of the wrong size, ...) and arbitrary terms (huge
  integers, `-0.0`, deep nesting, pids, refs, funs, ports, atoms that are no
  case). Some of them are valid by chance: `conforms?/2` says which. Atoms come
  from a fixed pool of existing atoms; none is ever created.

  Shapes that the current engine is known to mishandle are only generated with
  `known_bugs: true` (see `known_bugs/0`), so that a default run is green
  today and a strict run shows the bugs until they are fixed.
  """

  import Bitwise

  @typedoc "A generator: draws a term from the process's `:rand` state."
  @type gen :: (size :: non_neg_integer() -> term())

  # ------------------------------------------------------------------ running

  @doc """
  Runs `property` (a function of one generated input; it fails by raising)
  over `opts[:runs]` inputs from `generator`, default `runs(200)`, with seed
  `opts[:seed]`, default `seed/0`. Raises `ExUnit.AssertionError` naming the
  seed and the failing input.
  """
  @spec check(String.t(), gen(), (term() -> term()), keyword()) :: :ok
  def check(name, generator, property, opts \\ []) do
    seed = Keyword.get_lazy(opts, :seed, &seed/0)
    runs = Keyword.get_lazy(opts, :runs, fn -> runs(200) end)
    key = :erlang.phash2(name)

    Enum.each(0..(runs - 1)//1, fn i ->
      size = rem(i, 101)
      input = draw(generator, {seed, key, i}, size)

      case outcome(property, input) do
        :ok ->
          :ok

        {:failed, reason} ->
          smaller = search_smaller(generator, property, {seed, key}, size)
          report!(name, seed, i, runs, size, input, reason, smaller)
      end
    end)
  end

  @doc "The seed: `CAPSID_FUZZ_SEED`, or ExUnit's seed of this run."
  @spec seed() :: non_neg_integer()
  def seed do
    case System.get_env("CAPSID_FUZZ_SEED") do
      nil -> ExUnit.configuration()[:seed] || 0
      value -> String.to_integer(value)
    end
  end

  @doc "How many cases a property runs: `CAPSID_FUZZ_RUNS`, or `default`."
  @spec runs(pos_integer()) :: pos_integer()
  def runs(default) do
    case System.get_env("CAPSID_FUZZ_RUNS") do
      nil -> default
      value -> String.to_integer(value)
    end
  end

  defp draw(generator, seed, size) do
    _ = :rand.seed(:exsss, seed)
    generator.(size)
  end

  defp outcome(property, input) do
    property.(input)
    :ok
  rescue
    error -> {:failed, Exception.format(:error, error, __STACKTRACE__)}
  catch
    kind, value -> {:failed, Exception.format(kind, value, __STACKTRACE__)}
  end

  # Fresh inputs of every smaller size (a few per size), smallest first: a
  # cheap stand-in for shrinking that often finds a minimal reproduction.
  defp search_smaller(generator, property, {seed, key}, size) do
    Enum.find_value(0..(size - 1)//1, fn s ->
      Enum.find_value(1..30, fn k ->
        input = draw(generator, {seed, key, -(s * 100 + k)}, s)

        case outcome(property, input) do
          :ok -> nil
          {:failed, reason} -> {s, input, reason}
        end
      end)
    end)
  end

  defp report!(name, seed, i, runs, size, input, reason, smaller) do
    smaller_text =
      case smaller do
        nil ->
          "no smaller failing input found"

        {s, small, small_reason} ->
          "smallest failing input found (size #{s}):\n    #{show(small)}\n" <>
            indent(small_reason)
      end

    raise ExUnit.AssertionError,
      message: """
      property "#{name}" failed on case #{i} of #{runs} (size #{size}).
      Reproduce with CAPSID_FUZZ_SEED=#{seed}.
      input:
          #{show(input)}
      #{indent(reason)}
      #{smaller_text}
      """
  end

  @doc "A bounded `inspect` for reports (structs as maps: garbage may fake one)."
  @spec show(term()) :: String.t()
  def show(term), do: inspect(term, limit: 30, printable_limit: 200, width: 100, structs: false)

  defp indent(text) do
    text |> String.split("\n") |> Enum.map_join("\n", &("    " <> &1)) |> String.slice(0, 4000)
  end

  # --------------------------------------------------------- basic generators

  @doc "An integer in `lo..hi`, uniformly (big integers too)."
  @spec integer(integer(), integer()) :: gen()
  def integer(lo, hi), do: fn _size -> int(lo, hi) end

  @doc "One of `values`, uniformly."
  @spec member([term(), ...]) :: gen()
  def member(values), do: fn _size -> pick(values) end

  @doc "A value from one of `generators`, chosen uniformly."
  @spec one_of([gen(), ...]) :: gen()
  def one_of(generators), do: fn size -> pick(generators).(size) end

  @doc "A value from one of the generators, chosen with the given weights."
  @spec frequency([{pos_integer(), gen()}, ...]) :: gen()
  def frequency(weighted), do: fn size -> weighted(weighted).(size) end

  @doc "A tuple of one value of each generator."
  @spec tuple_of([gen()]) :: gen()
  def tuple_of(generators) do
    fn size -> generators |> Enum.map(& &1.(size)) |> List.to_tuple() end
  end

  @doc "`generator`'s values passed through `fun`."
  @spec map(gen(), (term() -> term())) :: gen()
  def map(generator, fun), do: fn size -> fun.(generator.(size)) end

  defp int(lo, hi) when hi >= lo, do: lo + :rand.uniform(hi - lo + 1) - 1

  defp pick(values) when is_list(values), do: Enum.at(values, :rand.uniform(length(values)) - 1)

  defp chance(percent), do: :rand.uniform(100) <= percent

  defp weighted(pairs) do
    total = pairs |> Enum.map(&elem(&1, 0)) |> Enum.sum()
    at = :rand.uniform(total)

    Enum.reduce_while(pairs, at, fn {w, value}, left ->
      if left <= w, do: {:halt, value}, else: {:cont, left - w}
    end)
  end

  # -------------------------------------------------------------- WIT values

  @ints %{
    s8: {-128, 127},
    u8: {0, 255},
    s16: {-32_768, 32_767},
    u16: {0, 65_535},
    s32: {-2_147_483_648, 2_147_483_647},
    u32: {0, 4_294_967_295},
    s64: {-9_223_372_036_854_775_808, 9_223_372_036_854_775_807},
    u64: {0, 18_446_744_073_709_551_615}
  }

  @specials [:nan, :infinity, :neg_infinity]

  # The largest f32, and the midpoint between it and 2^128: from there on,
  # rounding to f32 (ties to even) gives infinity.
  @f32_max 3.4028234663852886e38
  @f32_overflow 3.4028235677973366e38

  @doc "Generates valid arguments of WIT type `type` (see the module doc)."
  @spec value(Capsid.Types.t()) :: gen()
  def value(type), do: fn size -> valid(type, size) end

  defp valid(:bool, _size), do: pick([true, false])
  defp valid(type, _size) when is_map_key(@ints, type), do: edge_int(@ints[type])
  defp valid(:f64, _size), do: float64()
  defp valid(:f32, _size), do: float32()
  defp valid(:char, _size), do: code_point()
  defp valid(:string, size), do: string(size)
  defp valid({:list, :u8}, size), do: bytes(size)

  defp valid({:list, type}, size) do
    # Now and then a long list, of small elements so that a case stays cheap.
    {length, inner} =
      if huge?(size), do: {int(1_000, 10_000), 2}, else: {int(0, size), div(size, 2)}

    for _ <- 1..length//1, do: valid(type, inner)
  end

  defp valid({:tuple, types}, size), do: types |> Enum.map(&valid(&1, size)) |> List.to_tuple()

  defp valid({:record, fields}, size) do
    Map.new(fields, fn {name, type} -> {atom(name), valid(type, div(size, 2))} end)
  end

  defp valid({:variant, cases}, size) do
    case pick(cases) do
      {name, nil} -> atom(name)
      {name, type} -> {atom(name), valid(type, div(size, 2))}
    end
  end

  defp valid({:enum, names}, _size), do: atom(pick(names))

  defp valid({:flags, names}, size) do
    chosen = for _ <- 1..int(0, max(size, 1))//1, do: atom(pick(names))
    if chance(30), do: MapSet.new(chosen), else: chosen
  end

  defp valid({:option, inner}, size) do
    cond do
      chance(30) -> nil
      nilable?(inner) -> {:some, valid(inner, size)}
      true -> valid(inner, size)
    end
  end

  defp valid({:result, ok, error}, size) do
    {tag, type} = pick([{:ok, ok}, {:error, error}])
    if type == nil, do: tag, else: {tag, valid(type, size)}
  end

  # Integers: the bounds and their neighbours, powers of two, or uniform.
  defp edge_int({lo, hi}) do
    weighted([
      {3, fn -> pick(Enum.filter([lo, hi, lo + 1, hi - 1, 0, 1, -1], &(&1 in lo..hi))) end},
      {2, fn -> clamp(pick([1, -1]) * (1 <<< int(0, 64)) + int(-1, 1), lo, hi) end},
      {5, fn -> int(lo, hi) end}
    ]).()
  end

  defp clamp(i, lo, hi), do: i |> max(lo) |> min(hi)

  defp float64 do
    weighted([
      {2, fn -> pick(@specials) end},
      {1, fn -> pick([0.0, neg_zero()]) end},
      {1, fn -> pick([1.7976931348623157e308, -1.7976931348623157e308, 5.0e-324]) end},
      {1, fn -> pick([2.2250738585072014e-308, 0.1, -1.5, @f32_max]) end},
      {5, fn -> random_f64() end},
      {3, fn -> (:rand.uniform() - 0.5) * :math.pow(10, int(-10, 10)) end},
      {2, fn -> exact_integer() end}
    ]).()
  end

  defp float32 do
    weighted([
      {2, fn -> pick(@specials) end},
      {1, fn -> pick([0.0, neg_zero(), @f32_max, -@f32_max, 1.401298464324817e-45]) end},
      {5, fn -> random_f32() end},
      # f64 values in f32's range (rounded), and past it (infinity).
      {3, fn -> (:rand.uniform() - 0.5) * :math.pow(10, int(-45, 38)) end},
      {1, fn -> in_f32_range(random_f64()) end},
      {1, fn -> pick([3.4028235e38, -3.4028235e38, @f32_max]) end},
      {2, fn -> exact_integer() end}
    ]).()
  end

  # Finite values past f32's range are refused (DESIGN.md: out of range is a
  # bad argument), so valid f32 arguments stay inside it.
  defp in_f32_range(f) when abs(f) < @f32_overflow, do: f
  defp in_f32_range(f), do: f / 1.0e300

  # Any finite f64 bit pattern: subnormals, -0.0, huge and tiny values.
  defp random_f64 do
    <<f::float-64>> = <<int(0, 1)::1, int(0, 2046)::11, int(0, (1 <<< 52) - 1)::52>>
    f
  end

  # Any finite f32 bit pattern, as the f64 it is exactly.
  defp random_f32 do
    <<f::float-32>> = <<int(0, 1)::1, int(0, 254)::8, int(0, (1 <<< 23) - 1)::23>>
    f
  end

  defp neg_zero do
    <<f::float-64>> = <<1::1, 0::63>>
    f
  end

  # k * 2^e with |k| < 2^24 and e <= 100: exact in f32 and f64 (so an integer
  # argument involves no rounding), and within the i128 the NIF decodes.
  defp exact_integer, do: int(-(1 <<< 24) + 1, (1 <<< 24) - 1) * (1 <<< int(0, 100))

  # Unicode scalar values: the edges around the surrogates and the planes, or
  # uniform over both ranges.
  defp code_point do
    weighted([
      {2, fn -> pick([0, 0x7F, 0x80, 0x7FF, 0x800, 0xD7FF, 0xE000, 0xFFFD, 0xFFFF]) end},
      {1, fn -> pick([0x10000, 0x10FFFF, 0x1F600]) end},
      {3, fn -> int(0x20, 0x7E) end},
      {2, fn -> int(0, 0xD7FF) end},
      {2, fn -> int(0xE000, 0x10FFFF) end}
    ]).()
  end

  defp string(size) do
    cond do
      huge?(size) ->
        (chars(20) <> "✓") |> then(&String.duplicate(&1, div(huge_bytes(), byte_size(&1))))

      chance(10) ->
        ""

      true ->
        chars(size)
    end
  end

  defp chars(size) do
    alphabet =
      pick([
        fn -> int(0x20, 0x7E) end,
        fn -> pick([?é, ?ß, ?ñ, ?Ω, ?λ, ?—, ?✓]) end,
        fn -> int(0x4E00, 0x9FFF) end,
        fn -> int(0x1F600, 0x1F64F) end,
        &code_point/0
      ])

    for _ <- 1..int(0, size)//1, into: "", do: <<alphabet.()::utf8>>
  end

  defp bytes(size) do
    bin = :rand.bytes(if huge?(size), do: huge_bytes(), else: int(0, size))

    if chance(30) and byte_size(bin) < 10_000, do: :binary.bin_to_list(bin), else: bin
  end

  # Huge-ish values (64 KiB to about 1 MiB, lists of up to 10,000 elements):
  # now and then, at large sizes only (nested values get smaller sizes), so
  # that no case costs more than a few milliseconds.
  defp huge?(size), do: size >= 50 and chance(4)
  defp huge_bytes, do: int(1 <<< 16, 1 <<< 20)

  # Names come from the fixed type table of a test, never from random data.
  defp atom(name), do: name |> String.replace("-", "_") |> String.to_atom()

  @doc """
  What an identity function of WIT type `type` must return for the valid
  argument `input` (see the module doc).
  """
  @spec normalise(Capsid.Types.t(), term()) :: term()
  def normalise(type, input) when type in [:f32, :f64] and input in @specials, do: input
  def normalise(:f64, input) when is_number(input), do: input * 1.0
  def normalise(:f32, input) when is_number(input), do: to_f32(input * 1.0)
  def normalise({:list, :u8}, input) when is_list(input), do: :erlang.list_to_binary(input)
  def normalise({:list, type}, input) when is_list(input), do: Enum.map(input, &normalise(type, &1))

  def normalise({:tuple, types}, input) do
    types
    |> Enum.zip(Tuple.to_list(input))
    |> Enum.map(fn {t, v} -> normalise(t, v) end)
    |> List.to_tuple()
  end

  def normalise({:record, fields}, input) do
    Map.new(fields, fn {name, type} ->
      key = atom(name)
      {key, normalise(type, Map.fetch!(input, key))}
    end)
  end

  def normalise({:variant, cases}, {tag, payload}) do
    {_, type} = Enum.find(cases, fn {name, _} -> atom(name) == tag end)
    {tag, normalise(type, payload)}
  end

  def normalise({:flags, names}, input) do
    given = Enum.to_list(input)
    for name <- names, atom(name) in given, do: atom(name)
  end

  def normalise({:option, _}, nil), do: nil

  def normalise({:option, t}, v) do
    case {nilable?(t), v} do
      {true, {:some, v}} -> {:some, normalise(t, v)}
      _ -> normalise(t, v)
    end
  end

  def normalise({:result, ok, _}, {:ok, v}), do: {:ok, normalise(ok, v)}
  def normalise({:result, _, error}, {:error, v}), do: {:error, normalise(error, v)}
  def normalise(_type, input), do: input

  defp to_f32(f) when f >= @f32_overflow, do: :infinity
  defp to_f32(f) when f <= -@f32_overflow, do: :neg_infinity

  defp to_f32(f) do
    <<g::float-32>> = <<f::float-32>>
    g
  end

  @doc """
  Whether `a` and `b` are the same term, with floats compared bit for bit
  (`-0.0` is not `0.0`, which `==` cannot tell apart on OTP 25).
  """
  @spec same?(term(), term()) :: boolean()
  def same?(a, b), do: exact(a) == exact(b)

  defp exact(f) when is_float(f), do: {:float, <<f::float-64>>}
  defp exact(list) when is_list(list), do: exact_list(list)
  defp exact(tuple) when is_tuple(tuple), do: tuple |> Tuple.to_list() |> exact() |> List.to_tuple()

  defp exact(%{} = map),
    do: :maps.from_list(for {k, v} <- :maps.to_list(map), do: {exact(k), exact(v)})

  defp exact(other), do: other

  # Improper lists too.
  defp exact_list([head | tail]), do: [exact(head) | exact_list(tail)]
  defp exact_list([]), do: []
  defp exact_list(tail), do: exact(tail)

  @doc """
  Whether `term` is a valid argument of WIT type `type` according to
  DESIGN.md section 2 (the oracle for garbage that is valid by chance).
  """
  @spec conforms?(Capsid.Types.t(), term()) :: boolean()
  def conforms?(:bool, term), do: is_boolean(term)
  def conforms?(type, term) when is_map_key(@ints, type), do: int_in?(term, @ints[type])

  def conforms?(:f32, term) when is_number(term), do: abs(term) < @f32_overflow

  def conforms?(type, term) when type in [:f32, :f64] do
    is_float(term) or is_integer(term) or term in @specials
  end

  def conforms?(:char, term),
    do: is_integer(term) and term in 0..0x10FFFF and term not in 0xD800..0xDFFF

  def conforms?(:string, term), do: is_binary(term) and String.valid?(term)
  def conforms?({:list, :u8}, term) when is_binary(term), do: true

  def conforms?({:list, type}, term),
    do: proper_list?(term) and Enum.all?(term, &conforms?(type, &1))

  def conforms?({:tuple, types}, term) do
    is_tuple(term) and tuple_size(term) == length(types) and
      types |> Enum.zip(Tuple.to_list(term)) |> Enum.all?(fn {t, v} -> conforms?(t, v) end)
  end

  def conforms?({:record, fields}, term) do
    is_map(term) and map_size(term) == length(fields) and
      Enum.all?(fields, fn {name, type} ->
        key = atom(name)
        is_map_key(term, key) and conforms?(type, Map.fetch!(term, key))
      end)
  end

  def conforms?({:variant, cases}, term) do
    Enum.any?(cases, fn
      {name, nil} ->
        term === atom(name)

      {name, type} ->
        match?({_, _}, term) and elem(term, 0) === atom(name) and conforms?(type, elem(term, 1))
    end)
  end

  def conforms?({:enum, names}, term), do: Enum.any?(names, &(atom(&1) === term))

  def conforms?({:flags, names}, term) do
    case term do
      %{__struct__: MapSet, map: set} when is_map(set) -> all_flags?(names, Map.keys(set))
      list when is_list(list) -> proper_list?(list) and all_flags?(names, list)
      _ -> false
    end
  end

  def conforms?({:option, inner}, term) do
    if nilable?(inner),
      do: term == nil or (match?({:some, _}, term) and conforms?(inner, elem(term, 1))),
      else: term == nil or conforms?(inner, term)
  end

  def conforms?({:result, ok, error}, term) do
    Enum.any?([{:ok, ok}, {:error, error}], fn
      {tag, nil} -> term === tag
      {tag, type} -> match?({^tag, _}, term) and conforms?(type, elem(term, 1))
    end)
  end

  def conforms?(_type, _term), do: false

  defp all_flags?(names, items),
    do: Enum.all?(items, fn i -> Enum.any?(names, &(atom(&1) === i)) end)

  defp int_in?(term, {lo, hi}), do: is_integer(term) and term >= lo and term <= hi

  @doc """
  The known deviation of the current engine from DESIGN.md section 2 that
  `term`, an argument of WIT type `type`, runs into, if any (`nil`):

    * `:huge_integer_float`: an integer beyond the i128 range for a float is
      refused (`:bad_argument`), though any integer is accepted for a float;
    * `:non_canonical_name`: an enum, variant or flags atom spelled with `-`
      (`:"dark-slate-gray"`, even `:"dark_slate-gray"`) is accepted as the
      case `:dark_slate_gray`, though names are snake_case atoms;
    * `:fake_mapset`: a map that only claims to be a MapSet
      (`%{__struct__: MapSet}`) is accepted as no flags at all.

  Only the first deviation found is named. Tests tolerate them unless strict.
  """
  @spec deviation(Capsid.Types.t(), term()) :: atom() | nil
  def deviation(type, term) when type in [:f32, :f64] and is_integer(term) do
    if term < -(1 <<< 127) or term >= 1 <<< 127, do: :huge_integer_float
  end

  def deviation({:enum, names}, term) when is_atom(term), do: non_canonical(names, term)

  def deviation({:variant, cases}, term) do
    {tag, payload} =
      case term do
        {tag, payload} -> {tag, {:payload, payload}}
        tag -> {tag, nil}
      end

    if is_atom(tag) and non_canonical(Enum.map(cases, &elem(&1, 0)), tag) do
      :non_canonical_name
    else
      case {payload, Enum.find(cases, fn {name, _} -> atom(name) === tag end)} do
        {{:payload, value}, {_, type}} when type != nil -> deviation(type, value)
        _ -> nil
      end
    end
  end

  def deviation({:flags, names}, term) do
    case term do
      %{__struct__: MapSet, map: set} when is_map(set) ->
        first(Map.keys(set), &non_canonical(names, &1))

      %{__struct__: MapSet} ->
        :fake_mapset

      list when is_list(list) ->
        if proper_list?(list), do: first(list, &non_canonical(names, &1))

      _ ->
        nil
    end
  end

  def deviation({:list, type}, term) when is_list(term) do
    if proper_list?(term), do: first(term, &deviation(type, &1))
  end

  def deviation({:tuple, types}, term) when is_tuple(term) do
    if tuple_size(term) == length(types) do
      first(Enum.zip(types, Tuple.to_list(term)), fn {t, v} -> deviation(t, v) end)
    end
  end

  def deviation({:record, fields}, term) when is_map(term) do
    first(fields, fn {name, type} ->
      case Map.fetch(term, atom(name)) do
        {:ok, v} -> deviation(type, v)
        :error -> nil
      end
    end)
  end

  def deviation({:option, _}, nil), do: nil

  def deviation({:option, inner}, term) do
    case {nilable?(inner), term} do
      {true, {:some, v}} -> deviation(inner, v)
      {true, _} -> nil
      _ -> deviation(inner, term)
    end
  end

  def deviation({:result, ok, error}, {tag, v}) do
    case tag do
      :ok when ok != nil -> deviation(ok, v)
      :error when error != nil -> deviation(error, v)
      _ -> nil
    end
  end

  def deviation(_type, _term), do: nil

  # The engine reads an atom as the WIT name with every `_` made `-`.
  defp non_canonical(names, term) when is_atom(term) do
    wit = term |> Atom.to_string() |> String.replace("_", "-")
    if wit in names and atom(wit) !== term, do: :non_canonical_name
  end

  defp non_canonical(_names, _term), do: nil

  defp first(items, fun), do: Enum.find_value(items, fun)

  @doc "Whether `term` is a proper list (`[1 | 2]` is not)."
  @spec proper_list?(term()) :: boolean()
  def proper_list?([]), do: true
  def proper_list?([_ | tail]), do: proper_list?(tail)
  def proper_list?(_), do: false

  # ----------------------------------------------------------------- garbage

  @doc """
  Shapes that the current engine is known to mishandle, generated only with
  `known_bugs: true`. Each is a bug to fix in the engine, not a choice:

    * `:improper_lists`: an improper list anywhere in the arguments (`[1 | 2]`,
      or as the argument list itself);
    * `:wrapping_negative_bignums`: a negative integer of magnitude between
      2^127 and 2^128, which the NIF's i128 decoding wraps around
      (`1 - 2 ** 128` is read as `1`).
  """
  @spec known_bugs() :: [atom()]
  def known_bugs, do: [:improper_lists, :wrapping_negative_bignums]

  # A fixed pool of existing atoms: cases of the toolkit's types, their
  # kebab-case spellings, near misses, and unrelated atoms.
  @atoms [
    nil,
    true,
    false,
    :ok,
    :error,
    :some,
    :none,
    :nan,
    :infinity,
    :neg_infinity,
    :inf,
    :NaN,
    :red,
    :blue,
    :dark_slate_gray,
    :"dark-slate-gray",
    :darkSlateGray,
    :read,
    :write,
    :admin_access,
    :"admin-access",
    :circle,
    :rectangle,
    :polygon,
    :empty,
    :x,
    :y,
    :label_text,
    :"label-text",
    :name,
    :points,
    :shape,
    :maybe_maybe,
    :outcome,
    :eur,
    :usd,
    :percent,
    :fixed_cents,
    :buy_x_get_y,
    :taxable,
    :sku,
    :quantity,
    :tags,
    :undefined,
    :"",
    :héllo,
    :日本,
    MapSet,
    :__struct__,
    :map,
    :foo
  ]

  @doc "The pool of atoms that garbage draws from."
  @spec atoms() :: [atom()]
  def atoms, do: @atoms

  @doc """
  Generates arguments of `type` that are wrong somewhere (some valid by
  chance). `opts[:known_bugs]` (default false) adds the shapes of `known_bugs/0`.
  """
  @spec garbage(Capsid.Types.t(), keyword()) :: gen()
  def garbage(type, opts \\ []), do: fn size -> broken(type, size, opts) end

  @doc "Generates arbitrary terms (`opts` as for `garbage/2`)."
  @spec term(keyword()) :: gen()
  def term(opts \\ []), do: fn size -> any(size, opts) end

  # A valid value with one part broken: the whole of it (one time in three),
  # or a part at a random depth.
  defp broken(type, size, opts) do
    if chance(33), do: wrong(type, size, opts), else: break_inside(type, size, opts)
  end

  defp break_inside({:list, elem}, size, opts) do
    items = valid({:list, elem}, min(size, 20)) |> as_list()

    weighted([
      {6, fn -> replace_one(items, broken(elem, div(size, 2), opts)) end},
      {1, fn -> if elem == :u8, do: items ++ [256], else: [items] end},
      {1, fn -> improper(items, any(2, opts), opts) end}
    ]).()
  end

  defp break_inside({:tuple, types}, size, opts) do
    items = Enum.map(types, &valid(&1, size))

    weighted([
      {4,
       fn ->
         items
         |> replace_at(int(0, length(types) - 1), fn i -> broken(Enum.at(types, i), size, opts) end)
         |> List.to_tuple()
       end},
      {1, fn -> items |> Enum.drop(-1) |> List.to_tuple() end},
      {1, fn -> List.to_tuple(items ++ [any(2, opts)]) end},
      {1, fn -> items end}
    ]).()
  end

  defp break_inside({:record, fields}, size, opts) do
    map = valid({:record, fields}, size)
    {name, type} = pick(fields)
    key = atom(name)

    weighted([
      {4, fn -> Map.put(map, key, broken(type, div(size, 2), opts)) end},
      {1, fn -> Map.delete(map, key) end},
      {1, fn -> Map.put(map, pick(@atoms), any(2, opts)) end},
      {1, fn -> map |> Map.delete(key) |> Map.put(name, Map.fetch!(map, key)) end},
      {1, fn -> map |> Map.delete(key) |> Map.put(Atom.to_string(key), Map.fetch!(map, key)) end},
      {1, fn -> Map.to_list(map) end},
      {1, fn -> Map.put(map, :__struct__, URI) end}
    ]).()
  end

  defp break_inside({:variant, cases}, size, opts) do
    {name, type} = pick(cases)
    tag = atom(name)

    weighted([
      {4,
       fn -> if type, do: {tag, broken(type, div(size, 2), opts)}, else: {tag, any(2, opts)} end},
      {1, fn -> if type, do: tag, else: {tag, nil} end},
      {1, fn -> {tag} end},
      {1, fn -> {tag, nil, nil} end},
      {1, fn -> {name, if(type, do: valid(type, 2), else: nil)} end},
      {1, fn -> {pick(@atoms), any(2, opts)} end}
    ]).()
  end

  defp break_inside({:flags, names}, size, opts) do
    flags = Enum.map(names, &atom/1)

    weighted([
      {2, fn -> Enum.shuffle([pick(@atoms) | flags]) end},
      {2, fn -> Enum.shuffle([any(2, opts) | flags]) end},
      {1, fn -> MapSet.new([any(2, opts) | flags]) end},
      {1, fn -> Enum.map(names, &String.replace(&1, "-", "_")) end},
      {1, fn -> improper(flags, pick(flags), opts) end},
      {1, fn -> wrong({:flags, names}, size, opts) end}
    ]).()
  end

  defp break_inside({:option, inner}, size, opts) do
    if nilable?(inner) do
      weighted([
        {2, fn -> {:some, broken(inner, size, opts)} end},
        {1, fn -> valid(inner, size) end},
        {1, fn -> {:some} end},
        {1, fn -> {:some, nil, nil} end}
      ]).()
    else
      weighted([
        {3, fn -> broken(inner, size, opts) end},
        {1, fn -> {:some, valid(inner, size)} end}
      ]).()
    end
  end

  defp break_inside({:result, ok, error}, size, opts) do
    {tag, type} = pick([{:ok, ok}, {:error, error}])

    weighted([
      {3, fn -> if type, do: {tag, broken(type, size, opts)}, else: {tag, any(2, opts)} end},
      {1, fn -> if type, do: tag, else: {tag, nil} end},
      {1, fn -> {tag} end},
      {1, fn -> {tag, nil, nil} end},
      {1, fn -> {pick([:oops, :some, nil, "ok"]), valid(type || :u8, 2)} end}
    ]).()
  end

  defp break_inside(type, size, opts), do: wrong(type, size, opts)

  defp as_list(bin) when is_binary(bin), do: :binary.bin_to_list(bin)
  defp as_list(list), do: list

  defp replace_one([], new), do: [new]
  defp replace_one(items, new), do: replace_at(items, int(0, length(items) - 1), fn _ -> new end)

  defp replace_at(items, at, fun) do
    items |> Enum.with_index() |> Enum.map(fn {v, i} -> if i == at, do: fun.(i), else: v end)
  end

  # `items` with `tail` as its last tail (a known bug), or a proper list.
  defp improper(items, tail, opts) do
    if opts[:known_bugs], do: items ++ tail, else: items ++ [tail]
  end

  # A term that is not a `type`: near misses for that type, or anything.
  defp wrong(type, size, opts) do
    if chance(50), do: near_miss(type, size, opts), else: any(size, opts)
  end

  defp near_miss(:bool, _size, _opts), do: pick([nil, 0, 1, "true", :yes, :True, [true]])

  defp near_miss(type, _size, opts) when is_map_key(@ints, type) do
    {lo, hi} = @ints[type]

    pick([
      lo - 1,
      hi + 1,
      hi * 2 + 1,
      bignum(opts),
      bignum(opts),
      lo * 1.0,
      neg_zero(),
      0.5,
      "1",
      ~c"1",
      :nan,
      nil,
      {1}
    ])
  end

  defp near_miss(type, _size, opts) when type in [:f32, :f64] do
    pick(["1.0", nil, true, :inf, :NaN, :nan_, {1.0}, [1.0], bignum(opts), ~c"1"])
  end

  defp near_miss(:char, _size, opts) do
    pick([
      0xD800,
      0xDBFF,
      0xDC00,
      0xDFFF,
      0x110000,
      -1,
      (1 <<< 32) + ?a,
      (1 <<< 64) + ?a,
      bignum(opts),
      ?a * 1.0,
      "a",
      ~c"a",
      :a
    ])
  end

  defp near_miss(:string, size, opts) do
    pick([
      <<0xFF>>,
      <<?a, 0xC0, 0x80>>,
      <<0xED, 0xA0, 0x80>>,
      <<0xE2, 0x82>>,
      <<0xF4, 0x90, 0x80, 0x80>>,
      string(size) <> <<0xFE>>,
      <<1::3>>,
      <<"abc", 1::1>>,
      ~c"abc",
      ["a", "b"],
      :abc,
      nil,
      {"a"},
      any(2, opts)
    ])
  end

  defp near_miss({:list, :u8}, _size, opts) do
    pick([
      [256],
      [-1],
      [1.0],
      improper([1, 2], 3, opts),
      <<1::4>>,
      <<"é", 1::1>>,
      nil,
      {1, 2},
      :binary
    ])
  end

  defp near_miss({:list, _}, size, opts),
    do: pick(["abc", %{}, {}, nil, MapSet.new([1]), any(size, opts)])

  defp near_miss({:tuple, types}, size, _opts), do: Enum.map(types, &valid(&1, size))

  defp near_miss({:record, fields}, size, _opts),
    do:
      pick([nil, [], {}, fields, Map.new(fields), valid({:record, fields}, size) |> Map.to_list()])

  defp near_miss({:variant, _}, _size, _opts),
    do: pick([nil, "circle", {}, {1, 2}, :blue, %{circle: 1.0}])

  defp near_miss({:enum, names}, _size, _opts),
    do: pick([nil, hd(names), "red", 0, :circle, :"dark-slate-gray"])

  defp near_miss({:flags, _}, _size, opts) do
    pick([
      nil,
      :read,
      "read",
      %{read: true},
      %{__struct__: MapSet, map: :not_a_map},
      %{__struct__: MapSet},
      {:read},
      [[:read]],
      improper([:read], :write, opts)
    ])
  end

  defp near_miss({:option, _}, _size, _opts), do: pick([:none, :some, {:some}, {:ok, 1}, [], {nil}])

  defp near_miss({:result, _, _}, _size, _opts),
    do: pick([:oops, {:ok}, {:ok, 1, 2}, [ok: 1], %{ok: 1}, nil, true])

  defp near_miss(_type, size, opts), do: any(size, opts)

  # Any term: leaves of every kind, containers, and now and then deep nesting.
  defp any(size, opts) do
    if size <= 1 or chance(40) do
      leaf(opts)
    else
      inner = div(size, 3)

      weighted([
        {3, fn -> for _ <- 1..int(0, 5)//1, do: any(inner, opts) end},
        {2, fn -> List.to_tuple(for _ <- 1..int(0, 5)//1, do: any(inner, opts)) end},
        {2, fn -> Map.new(1..int(0, 4)//1, fn _ -> {any(2, opts), any(inner, opts)} end) end},
        {1, fn -> MapSet.new(for _ <- 1..int(0, 3)//1, do: any(inner, opts)) end},
        {1, fn -> improper([any(inner, opts)], any(inner, opts), opts) end},
        {1, fn -> deep(int(100, 5_000), opts) end}
      ]).()
    end
  end

  defp deep(depth, opts) do
    wrap = pick([&[&1], &{&1}, &%{x: &1}, &{:some, &1}, &{:ok, &1}])
    Enum.reduce(1..depth, leaf(opts), fn _, acc -> wrap.(acc) end)
  end

  defp leaf(opts) do
    weighted([
      {3, fn -> int(-1000, 1000) end},
      {2, fn -> pick([-(1 <<< 63) - 1, 1 <<< 1000, bignum(opts)]) end},
      {2, fn -> pick([0.0, neg_zero(), 1.5, -1.0e308, 5.0e-324, random_f64()]) end},
      {3, fn -> pick(@atoms) end},
      {2, fn -> pick(["", "abc", "héllo", <<0xFF, 0xFE>>, <<1::7>>, :rand.bytes(int(0, 20))]) end},
      {1, fn -> pick([self(), spawn(fn -> :ok end), make_ref(), hd(Port.list())]) end},
      {1, fn -> pick([fn -> :ok end, &Kernel.+/2, fn x -> x end]) end},
      {1, fn -> pick([[], {}, %{}, ~c"abc", [a: 1]]) end}
    ]).()
  end

  # Integers past 64 bits: either side of 2^127 and 2^128 (where a 128-bit
  # decoder can go wrong) and far beyond. Negative ones of magnitude between
  # 2^127 and 2^128 only with known_bugs (see known_bugs/0).
  defp bignum(opts) do
    if opts[:known_bugs] == true and chance(30) do
      pick([-(1 <<< 128) + int(1, 300), -(1 <<< 127) - int(1, 300)])
    else
      pick([
        1 <<< 64,
        -(1 <<< 64),
        (1 <<< 127) - 1,
        1 <<< 127,
        -(1 <<< 127),
        (1 <<< 128) - 1,
        1 <<< 128,
        -(1 <<< 128),
        1 <<< 200,
        -(1 <<< 200)
      ])
    end
  end

  # Whether a value of `type` can be `nil`: an `option` of it then spells
  # its `some` out (`{:some, v}`), as DESIGN.md section 2 says.
  defp nilable?({:option, _}), do: true
  defp nilable?({:enum, names}), do: "nil" in names
  defp nilable?({:variant, cases}), do: Enum.any?(cases, &match?({"nil", nil}, &1))
  defp nilable?(_), do: false
end
