defmodule Capsid.Types do
  @moduledoc """
  WIT types as Elixir terms, as returned by `Capsid.Component.exports/1` and
  `Capsid.Component.imports/1`, and their WIT text form.

  | WIT                     | type term                                  |
  |-------------------------|--------------------------------------------|
  | `bool`, `u8` … `s64`    | `:bool`, `:u8` … `:s64`                    |
  | `f32`, `f64`            | `:f32`, `:f64`                             |
  | `char`, `string`        | `:char`, `:string`                         |
  | `list<T>`               | `{:list, t}`                               |
  | `tuple<A, B>`           | `{:tuple, [a, b]}`                         |
  | `record { x: s32 }`     | `{:record, [{"x", :s32}]}`                 |
  | `variant { a(u8), b }`  | `{:variant, [{"a", :u8}, {"b", nil}]}`     |
  | `enum { a, b }`         | `{:enum, ["a", "b"]}`                      |
  | `flags { a, b }`        | `{:flags, ["a", "b"]}`                     |
  | `option<T>`             | `{:option, t}`                             |
  | `result<T, E>`          | `{:result, t | nil, e | nil}`              |
  | `own<R>` / `borrow<R>`  | `{:own, "r"}` / `{:borrow, "r"}`           |

  Names are WIT's own (kebab-case); values in calls use snake_case atoms (see
  `Capsid`).
  """

  @type t ::
          :bool
          | :s8
          | :u8
          | :s16
          | :u16
          | :s32
          | :u32
          | :s64
          | :u64
          | :f32
          | :f64
          | :char
          | :string
          | {:list, t()}
          | {:tuple, [t()]}
          | {:record, [{String.t(), t()}]}
          | {:variant, [{String.t(), t() | nil}]}
          | {:enum, [String.t()]}
          | {:flags, [String.t()]}
          | {:option, t()}
          | {:result, t() | nil, t() | nil}
          | {:own, String.t()}
          | {:borrow, String.t()}
          | atom()

  @doc """
  Renders a type term as WIT.

      iex> Capsid.Types.to_wit({:list, {:tuple, [:string, :u32]}})
      "list<tuple<string, u32>>"
      iex> Capsid.Types.to_wit({:result, :u32, nil})
      "result<u32>"
      iex> Capsid.Types.to_wit({:record, [{"x", :f64}, {"label-text", {:option, :string}}]})
      "record { x: f64, label-text: option<string> }"
  """
  @spec to_wit(t()) :: String.t()
  def to_wit(type) when is_atom(type), do: Atom.to_string(type)
  def to_wit({:list, t}), do: "list<#{to_wit(t)}>"
  def to_wit({:tuple, ts}), do: "tuple<#{Enum.map_join(ts, ", ", &to_wit/1)}>"
  def to_wit({:option, t}), do: "option<#{to_wit(t)}>"
  def to_wit({:result, nil, nil}), do: "result"
  def to_wit({:result, ok, nil}), do: "result<#{to_wit(ok)}>"
  def to_wit({:result, nil, err}), do: "result<_, #{to_wit(err)}>"
  def to_wit({:result, ok, err}), do: "result<#{to_wit(ok)}, #{to_wit(err)}>"
  def to_wit({:enum, names}), do: "enum { #{Enum.join(names, ", ")} }"
  def to_wit({:flags, names}), do: "flags { #{Enum.join(names, ", ")} }"
  def to_wit({:own, name}), do: "own<#{name}>"
  def to_wit({:borrow, name}), do: "borrow<#{name}>"

  def to_wit({:record, fields}),
    do: "record { #{Enum.map_join(fields, ", ", fn {n, t} -> "#{n}: #{to_wit(t)}" end)} }"

  def to_wit({:variant, cases}) do
    body =
      Enum.map_join(cases, ", ", fn
        {n, nil} -> n
        {n, t} -> "#{n}(#{to_wit(t)})"
      end)

    "variant { #{body} }"
  end

  @doc """
  Renders a function signature as WIT.

      iex> Capsid.Types.signature([{"a", :s32}, {"b", :s32}], :s32)
      "func(a: s32, b: s32) -> s32"
      iex> Capsid.Types.signature([], nil)
      "func()"
  """
  @spec signature([{String.t(), t()}], t() | nil) :: String.t()
  def signature(params, result) do
    args = Enum.map_join(params, ", ", fn {n, t} -> "#{n}: #{to_wit(t)}" end)

    case result do
      nil -> "func(#{args})"
      t -> "func(#{args}) -> #{to_wit(t)}"
    end
  end
end
